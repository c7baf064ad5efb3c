"""How a `glowtrain` command's process speaks and ends: exit codes and the one line that says why, the signals
that stop it, warnings and torch's log lines as single lines, and output whose reader has gone."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import io
import json
import logging
import os
import re
import shlex
import signal
import sys
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import typer

from glowtrain.errors import STOP_SIGNALS, MissingData, Stopped, UserError, nohup

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130

state = {"debug": False, "whole_process": False, "ended": False}  # ended: `end` has said how the command ended
TORCH_LOG_FORMAT = "%(levelname)s (torch): %(message)s"
TORCH_DEBUGGING = {"TORCH_LOGS", "TORCH_LOGS_FORMAT", "TORCH_COMPILE_DEBUG", "TORCH_TRACE"}


def torch_log_lines(debug: bool) -> None:
    """torch's own log lines (its compiler's, a CPU's "No CUDA runtime is found") read as our lines do: `warning
    (torch): ...`, `error (torch): ...`. torch reads the format when it is imported, and the command's processes
    (torchrun's too) inherit it; someone debugging torch keeps its own form."""
    if not debug and "torch" not in sys.modules and not TORCH_DEBUGGING & set(os.environ):
        os.environ["TORCH_LOGS_FORMAT"] = TORCH_LOG_FORMAT
    if os.environ.get("TORCH_LOGS_FORMAT") == TORCH_LOG_FORMAT:  # this process is a command's: its names, lowercase
        for level in (logging.WARNING, logging.ERROR, logging.CRITICAL):
            logging.addLevelName(level, logging.getLevelName(level).lower())


def resume_command(run_dir: str) -> str:
    """The command that continues a run, with the processes it trained on: another count would silently change
    the global batch (batch_size x processes), so the resumed run would not be the one that was stopped."""
    command = f"glowtrain fit --resume auto --out {shlex.quote(run_dir)}"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        return command
    if int(os.environ.get("LOCAL_WORLD_SIZE", processes)) == processes:  # one machine: --nproc launches them all
        return f"{command} --nproc {processes}"
    return f"{command}, launched on {processes} processes as before (another count changes the global batch)"


def errors_to_exit_codes(command):
    """UserError -> one line on stderr and exit 2; interruption -> exit 130; anything else -> exit 1."""
    options = inspect.signature(command).parameters
    on_a_run = "data" in options  # it takes --data, not the config's data keys

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from glowtrain.train import Interrupted, TrainingDiverged  # late: keeps `glowtrain --help` fast

        try:
            return command(*args, **kwargs)
        except UserError as e:
            if state["debug"]:
                traceback.print_exc()
            end(EXIT_BAD_INPUT, f"error: {e.for_run() if on_a_run and isinstance(e, MissingData) else e}")
        except Interrupted as e:
            step, run_dir = e.args
            on_rank_0 = os.environ.get("RANK", "0") == "0"  # under torchrun, one line for the job, not one per process
            end(EXIT_INTERRUPTED, f"interrupted at step {step}; checkpoint saved. Continue with: "
                                   f"{resume_command(run_dir)}" if on_rank_0 else None)
        except Stopped as e:
            end(EXIT_INTERRUPTED, str(e))
        except TrainingDiverged as e:  # the run's numbers, not a bug of ours: its message is the whole story
            if state["debug"]:
                traceback.print_exc()
            end(EXIT_FAILURE, f"error: training diverged: {e}")
        except KeyboardInterrupt:
            end(EXIT_INTERRUPTED, "interrupted")
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if state["debug"]:
                traceback.print_exc()
            end(EXIT_FAILURE, None if state["debug"] else _out_of_memory_line(e, options) or
                 f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")

    return wrapper


def _out_of_memory_line(error: Exception, options: Iterable[str]) -> str | None:
    """One line for a model or batch too large for the memory at hand (torch's own message runs to a paragraph),
    with the fix the command takes (`options`: its parameters)."""
    import torch

    on_gpu = isinstance(error, torch.OutOfMemoryError)
    if not on_gpu and not (isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error)):
        return None
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(error))
    amount = asked.group(1) if asked else ""
    if amount.endswith(" bytes") and amount[:-6].isdigit():  # the CPU's count, in bytes
        amount = f"{int(amount[:-6]) / 2**30:,.2f} GiB"
    return (f"error: out of {'GPU' if on_gpu else 'CPU'} memory{f' (it asked for {amount} more)' if amount else ''}"
            f" — {_memory_fix(set(options))}")


def _memory_fix(options: set[str]) -> str:
    if "resume" in options:  # fit
        return ("lower train.batch_size (train.eval_batch_size or train.init_batch_size if it ran out evaluating or "
                "starting), model.hidden_channels or model.n_steps, or set train.memory_saving=true")
    if "set_" in options:  # info: the model a config describes
        return "lower model.hidden_channels or model.n_steps"
    if "batch_size" in options:  # sample, eval, score
        return "pass a smaller --batch-size"
    if options & {"n", "pairs"}:  # reconstruct, interpolate, manipulate: all their images in one batch
        return "ask for fewer images (--n, --pairs)"
    return "use a device with more memory (--device)"


# Set by `fit --nproc` for the processes it starts: a folder where each one leaves how it ended, so that the
# parent speaks once for the job instead of every process repeating the same line.
JOB_REPORTS = "GLOWTRAIN_JOB_REPORTS"
LAUNCHER_PID = "GLOWTRAIN_LAUNCHER_PID"  # the parent of `fit --nproc`'s processes: they stop if it dies


def end(code: int, line: str | None) -> NoReturn:
    """Exit `code` after saying `line` on stderr; a process of `fit --nproc` leaves both to its parent."""
    # On its way out, a Ctrl-C still held down would only break the clean-up (progress bars closing in their
    # __del__) with tracebacks after the one line.
    ignore_signals(*STOP_SIGNALS)
    if report_to_launcher(code, line):
        line = None
    if line:
        _close_progress_bars()
        typer.echo(line, err=True)
    state["ended"] = True
    raise typer.Exit(code) from None


def _close_progress_bars() -> None:
    """Close the bars an exception left open (a generator's, closed only when collected): the line said after them
    began at the end of the bar ("... 35.2img/s]interrupted")."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def ignore_signals(*signals: int) -> None:
    """From here on, the `glowtrain` command ignores these signals; a caller in Python (such as the tests) keeps
    its own handlers."""
    _handle_signals(signals, signal.SIG_IGN)


def interrupt_on_stop_signals() -> None:
    """SIGTERM (`kill`, a scheduler's time limit) and SIGHUP (a closed terminal) end a command as Ctrl-C does: its
    clean-ups run and it says `interrupted`, exit 130. Left to their default, they ended it at once without a
    word (`fit` too, before its trainer took them over to save first). A SIGHUP ignored when the command started
    stays ignored: `nohup` ignores it so that the command outlives its terminal."""
    _handle_signals([sig for sig in STOP_SIGNALS if sig != signal.SIGINT and not nohup(sig)], _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def default_stop_signals() -> None:
    """Once the command is over, a late SIGTERM ends the process as it always did, not with a traceback from an
    exit handler that the KeyboardInterrupt broke into."""
    _handle_signals([sig for sig in STOP_SIGNALS if signal.getsignal(sig) == _interrupt], signal.SIG_DFL)


def _handle_signals(signals: Iterable[int], handler) -> None:
    if state["whole_process"]:
        with contextlib.suppress(ValueError):  # ValueError: not the main thread, where signals do not land anyway
            for sig in signals:
                signal.signal(sig, handler)


def report_to_launcher(code: int, line: str | None) -> bool:
    """A process of `fit --nproc` leaves its exit code and line to its parent; False when it is none (or its
    parent is gone, its folder with it), so that it speaks for itself."""
    folder = os.environ.get(JOB_REPORTS)
    if not folder or "RANK" not in os.environ:
        return False
    report = Path(folder) / f"{os.environ['RANK']}.json"
    partial = report.with_suffix(".partial")
    try:
        partial.write_text(json.dumps({"exit_code": code, "line": line}))
        partial.replace(report)  # the parent never reads half a report
    except OSError:
        return False
    return True


def trained() -> None:
    """Training is over and saved. A Ctrl-C from here on (while the summary prints) would only turn a finished
    run into an interrupted one, exit code 130: it is ignored, and a process of `fit --nproc` reports that it
    finished, so that its launcher, which the same Ctrl-C stopped, ends the job with 0."""
    ignore_signals(*STOP_SIGNALS)
    report_to_launcher(0, None)


class OutputThatOutlivesItsReader(io.TextIOBase):
    """stdout or stderr whose reader may leave (`glowtrain fit | head`, or a terminal hung up: its ssh session
    closed): what follows is dropped and the work goes on, instead of a BrokenPipeError (or EIO) ending a training
    run before it saves."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._guarded(self.stream.write, text) or len(text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, action, *args):
        try:
            return action(*args)
        except OSError as e:
            if not isinstance(e, BrokenPipeError) and e.errno != errno.EIO:
                raise
            # Whatever is buffered or written later (here, by libraries, at exit) goes nowhere, silently.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            return None

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:
        return self.stream.encoding

    @property
    def buffer(self):
        return self.stream.buffer


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command: each warning once, as one line (`warning: ...`, naming the library
    it came from when that is not glowtrain), instead of Python's two lines with a source path; --debug keeps those.
    In a job of several processes only rank 0 speaks, as every process would repeat the same warnings."""
    if state["debug"]:
        with contextlib.suppress(OSError):
            (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    text = " ".join(str(message).split())
    if (category, text) in warned or os.environ.get("RANK", "0") != "0":
        return
    warned.add((category, text))
    origin = warning_origin(filename)
    stream = file or sys.stderr
    try:
        if _in_data_worker():  # its copy of a progress bar is stale: written through it, the bar would jump back
            stream.write(f"warning{origin}: {text}\n")
            return
        from tqdm import tqdm  # between a progress bar's redraws, not through one

        tqdm.write(f"warning{origin}: {text}", file=stream)
    except OSError:  # as Python's own: a closed or invalid stream loses the warning, not the run
        pass


def warning_origin(filename: str) -> str:
    """' (torch)' for a warning raised in an installed package, '' for glowtrain's own or an unknown place."""
    ours = Path(__file__).resolve().parents[1]  # the glowtrain package: installed, it is in site-packages too
    if not filename or filename.startswith("<") or Path(filename).resolve().is_relative_to(ours):
        return ""
    parts = Path(filename).parts
    for installed in ("site-packages", "dist-packages"):
        if installed in parts[:-1]:
            return f" ({parts[parts.index(installed) + 1].removesuffix('.py')})"
    return f" ({Path(filename).stem})"


def _in_data_worker() -> bool:
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


warned: set[tuple[type, str]] = set()

def exit_saying(code: int, line: str) -> NoReturn:
    """`end` outside typer: the process exits itself with the code `end` hands typer."""
    try:
        end(code, line)
    except typer.Exit as exited:
        sys.exit(exited.exit_code)


def usage_error(error: Exception) -> int:
    """Say a usage error in one line and return its exit code; with no arguments at all, the help was the answer."""
    context = getattr(error, "ctx", None)
    if type(error).__name__ == "NoArgsIsHelpError":
        if error.format_message():  # rich help prints itself while the error is made; plain help comes here
            error.show()
        return EXIT_BAD_INPUT
    message = error.format_message()
    hint = f" — see '{context.command_path} -h'" if context is not None else ""
    if context is not None and context.info_name == "score" and "unexpected extra argument" in message:
        # `--images imgs/*.png`: the shell gives the option its first file and leaves the rest as arguments.
        hint = (" — a shell pattern such as imgs/*.png gives one word per file: pass their folder (--images imgs) "
                "or put --images (or --against) before each file")
    typer.echo(f"error: {message}{hint}", err=True)
    return getattr(error, "exit_code", EXIT_BAD_INPUT)
