"""`fit --nproc`: one command run in several processes through torchrun's launcher, ended as one process would
end (one exit code, each line once)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import typer

from glowtrain.cli import process
from glowtrain.cli.process import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED

STOP_GRACE_S = 300  # what `fit --nproc` gives its processes to stop cleanly after a SIGTERM


def run_processes(nproc: int, args: list[str]) -> None:
    """`glowtrain <args>` in nproc processes through torchrun's launcher, ended as one process would end."""
    import tempfile

    from glowtrain.distributed import run_local_job

    # torchrun SIGKILLs workers this long after forwarding a SIGTERM (30 s by default): enough for the
    # current step and a paper-size checkpoint on a slow disk. Set it yourself to choose another.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_S))
    with tempfile.TemporaryDirectory(prefix="glowtrain-job-") as folder:
        os.environ[process.JOB_REPORTS] = folder  # the processes inherit it
        os.environ[process.LAUNCHER_PID] = str(os.getpid())
        try:
            outcome = run_local_job(nproc, args, quiet=not process.state["debug"], pid_folder=Path(folder),
                                    ignore_late_signals=True)
        finally:
            del os.environ[process.JOB_REPORTS], os.environ[process.LAUNCHER_PID]
        reports = {int(path.stem): json.loads(path.read_text()) for path in Path(folder).glob("*.json")}
    code, lines = job_end(reports, outcome.failed, outcome.signalled, outcome.forced, n_processes=nproc)
    for line in lines:
        typer.echo(line, err=True)
    process.state["ended"] = True  # the job's lines are this command's: nothing more to say
    if code:
        raise typer.Exit(code)


def job_end(reports: dict[int, dict], failed: dict[int, int], signalled: bool,
            forced: bool = False, n_processes: int = 0) -> tuple[int, list[str]]:
    """The exit code and lines of one process, from the reports of a job's processes (rank -> exit code and line),
    torchrun's failed ranks (rank -> exit code), whether a signal stopped it and whether another then stopped it
    at once. Bad input comes first (what the other processes then hit follows from it), then a stop at once (what
    they hit on the way out, a peer gone mid-step, is its doing), then a failure, then an interruption; a job whose
    `n_processes` all reported that they finished ends with 0 whatever came after. Each line is said once."""

    def said(code: int) -> list[str]:
        lines = [report["line"] for _, report in sorted(reports.items()) if report["exit_code"] == code]
        return list(dict.fromkeys(line for line in lines if line))

    codes = {report["exit_code"] for report in reports.values()}
    if len(reports) == n_processes and codes == {0}:  # every process had finished training when a signal came
        return 0, []
    if EXIT_BAD_INPUT in codes:
        return EXIT_BAD_INPUT, said(EXIT_BAD_INPUT)
    if forced:
        return EXIT_INTERRUPTED, said(EXIT_INTERRUPTED)[:1] or ["interrupted"]
    silent = {rank: code for rank, code in sorted(failed.items()) if rank not in reports}
    if EXIT_FAILURE in codes or silent:
        # A process killed outright (SIGKILL, a crash) is said too, after the failures reported: it may be the cause
        # (the others then only saw a peer gone) or the launcher's last resort after one. SIGTERM and SIGINT are how
        # a launcher stops the rest after a failure, which the reports say.
        stops = (signal.SIGINT, signal.SIGTERM)
        killed = [_silent_failure(rank, code) for rank, code in silent.items() if code < 0 and -code not in stops]
        return EXIT_FAILURE, said(EXIT_FAILURE) + killed or [_silent_failure(r, c) for r, c in silent.items()]
    if signalled or EXIT_INTERRUPTED in codes:
        return EXIT_INTERRUPTED, said(EXIT_INTERRUPTED) or ["interrupted"]
    return 0, []


def _silent_failure(rank: int, exit_code: int) -> str:
    """A line for a process that ended without a report: killed, or failed before glowtrain's error handling."""
    if exit_code >= 0:
        return f"error: process {rank} of the job exited with code {exit_code}"
    try:
        name = signal.Signals(-exit_code).name
    except ValueError:
        name = f"signal {-exit_code}"
    why = (" (often the system's out-of-memory killer: if so, lower train.batch_size or set "
           "train.memory_saving=true)") if name == "SIGKILL" else ""
    return f"error: process {rank} of the job was killed by {name}{why}"


def without_option(args: list[str], name: str) -> list[str]:
    """argv without `name VALUE` or `name=VALUE`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept
