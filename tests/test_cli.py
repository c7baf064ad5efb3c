"""The `glowtrain` command end to end: help and version, a tiny fit, sampling, and errors as exit codes."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, assert_one_line_error, invoke, ok, sets
from PIL import Image

import glowtrain.train as training
from glowtrain import __version__
from glowtrain.checkpoint import load_checkpoint
from glowtrain.cli import app, main
from glowtrain.config import apply_overrides, default_config
from glowtrain.errors import STOP_SIGNALS, UserError
from glowtrain.runs import RunDir

TINY = TINY_RUN


@pytest.fixture
def fitted(tiny_cli_run):
    return tiny_cli_run


# ---------------------------------------------------------------------------- help and version


def test_help_lists_the_commands_and_h_is_an_alias():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "fit" in result.output and "sample" in result.output
    short = invoke("-h")
    assert short.exit_code == 0 and short.output == result.output
    assert invoke("fit", "-h").exit_code == 0 and "--resume" in invoke("fit", "-h").output


def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"glowtrain {__version__}"


def _run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The `glowtrain` entry point itself (not CliRunner): exit code, stdout, stderr. What it sets for the rest of
    a process (its stdout wrapper, its own state, Ctrl-C ignored on the way out) is put back afterwards."""
    import signal

    from glowtrain.cli import process

    monkeypatch.setattr(sys, "argv", ["glowtrain", *args])
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setitem(process.state, "whole_process", False)
    monkeypatch.setitem(process.state, "ended", process.state["ended"])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as ended:
            main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    return ended.value.code, out.out, out.err


@pytest.mark.parametrize("args, needle, hint", [
    (("fit", "--sett", "train.steps=1"), "No such option: --sett (Possible options: --set)", "'glowtrain fit -h'"),
    (("fitt",), "No such command 'fitt'. Did you mean 'fit'?", "'glowtrain -h'"),
    (("sample", "--n", "abc"), "Invalid value for '--n'", "'glowtrain sample -h'"),
    (("sample", "--seed", str(2**32)), "Invalid value for '--seed'", "'glowtrain sample -h'"),  # config.SEED_LIMIT
    (("eval", "--seed", str(2**64)), "Invalid value for '--seed'", "'glowtrain eval -h'"),  # no effect, but torch's
])
def test_typers_own_usage_errors_are_one_line_with_exit_2(monkeypatch, capsys, args, needle, hint):
    code, out, err = _run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert lines[0].endswith(f"see {hint}")


def test_files_a_shell_pattern_gave_to_one_images_option_get_the_fix(monkeypatch, capsys):
    code, out, err = _run_main(monkeypatch, capsys, "score", "--images", "imgs/a.png", "imgs/b.png", "imgs/c.png")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "unexpected extra argument" in lines[0], err
    assert lines[0].endswith("— a shell pattern such as imgs/*.png gives one word per file: pass their folder "
                             "(--images imgs) or put --images (or --against) before each file")


def test_the_command_ignores_ctrl_c_on_its_way_out_but_python_callers_keep_theirs(monkeypatch, capsys):
    """A Ctrl-C still held down after the one `interrupted` line would only print tracebacks from clean-ups."""
    import signal

    import typer

    from glowtrain.cli import process

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for whole_process in (False, True):
            monkeypatch.setitem(process.state, "whole_process", whole_process)
            with pytest.raises(typer.Exit):
                process.end(130, "interrupted")
            expected = {sig: signal.SIG_IGN for sig in STOP_SIGNALS} if whole_process else handlers
            assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == expected
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert capsys.readouterr().err == "interrupted\ninterrupted\n"


def test_the_last_line_starts_on_a_line_of_its_own_after_a_bar_left_open(capsys):
    """A generator's bar is closed only when collected: `score` interrupted said "...img/s]interrupted"."""
    import signal

    import typer
    from tqdm import tqdm

    from glowtrain.cli import process

    def scoring():
        yield from tqdm(range(10), desc="scoring", file=sys.stderr)

    handler = signal.getsignal(signal.SIGINT)
    try:
        images = scoring()
        next(images)  # the bar is open, its generator suspended, as when Ctrl-C reached a command
        with pytest.raises(typer.Exit):
            process.end(130, "interrupted")
    finally:
        signal.signal(signal.SIGINT, handler)
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted\n") and "scoring:" in err
    del images


@pytest.mark.slow
def test_fit_whose_output_reader_leaves_trains_on_and_saves(tmp_path):
    """`glowtrain fit | head -1` (and `2>&1 | head -1`): the lines after the reader has gone are dropped, the run
    finishes."""
    settings = sets(*TINY, "train.steps=12", "train.log_every=1", "train.checkpoint_every=12")
    job = subprocess.Popen([sys.executable, "-m", "glowtrain", "fit", "--out", str(tmp_path / "run"), "--no-progress",
                            *settings], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert job.stdout.readline().startswith("data: ")
    job.stdout.close()  # the reader leaves; 12 logging steps are still to come
    stderr = job.stderr.read()
    assert job.wait(timeout=300) == 0, stderr
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 12
    both = subprocess.Popen([sys.executable, "-m", "glowtrain", "fit", "--out", str(tmp_path / "both"), *settings],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    assert both.stdout.readline()  # then the reader of both streams (and of the progress bar) leaves
    both.stdout.close()
    assert both.wait(timeout=300) == 0
    assert load_checkpoint(tmp_path / "both" / "checkpoints" / "last.pt")["step"] == 12


def test_the_command_says_each_warning_once_in_one_line_naming_its_library(monkeypatch, capsys, tmp_path):
    from glowtrain.cli import process

    monkeypatch.setattr(process, "warned", set())
    monkeypatch.delenv("RANK", raising=False)
    ours = str(Path(process.__file__).parents[1] / "train.py")
    torchs = "/home/u/glowtrain/.venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py"  # a clone's venv
    for _ in range(2):
        process.one_line_warning(UserWarning("train.amp=bf16 on a CPU: slow"), UserWarning, ours, 3)
        process.one_line_warning(UserWarning("This DataLoader will create 4 worker processes.\n  Lower it."),
                                 UserWarning, torchs, 431)
    assert capsys.readouterr().err == ("warning: train.amp=bf16 on a CPU: slow\n"
                                       "warning (torch): This DataLoader will create 4 worker processes. Lower it.\n")
    for place, origin in (("/usr/lib/python3/dist-packages/PIL/Image.py", " (PIL)"), ("<frozen importlib>", ""),
                          ("/home/u/notebook_helpers.py", " (notebook_helpers)")):
        assert process.warning_origin(place) == origin
    installed = tmp_path / "lib" / "python3.12" / "site-packages" / "glowtrain"  # pip install . (the Docker image)
    with monkeypatch.context() as patched:
        patched.setattr(process, "__file__", str(installed / "cli" / "process.py"))
        assert process.warning_origin(str(installed / "train.py")) == ""
        assert process.warning_origin(str(installed.parent / "torch" / "serialization.py")) == " (torch)"
    for rank, said in (("1", ""), ("0", "warning: another\n")):  # torchrun's processes: rank 0 speaks for the job
        monkeypatch.setenv("RANK", rank)
        process.one_line_warning(UserWarning("another"), UserWarning, ours, 3)
        assert capsys.readouterr().err == said
    # In a data worker, not through tqdm: the worker's copy of the progress bar would be redrawn at an old step.
    monkeypatch.setattr(process, "_in_data_worker", lambda: True)
    monkeypatch.setattr("tqdm.tqdm.write", lambda *a, **k: pytest.fail("a data worker wrote through tqdm"))
    process.one_line_warning(UserWarning("odd image"), UserWarning, ours, 3)
    assert capsys.readouterr().err == "warning: odd image\n"
    monkeypatch.setitem(process.state, "debug", True)  # --debug: Python's own form, with the source
    process.one_line_warning(UserWarning("train.amp=bf16 on a CPU: slow"), UserWarning, ours, 3)
    assert "train.py:3: UserWarning: train.amp=bf16" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fit_prints_torchs_and_its_own_warnings_once_as_one_line_each(tmp_path):
    import os

    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(tmp_path / "images" / f"{i:02d}.png")
    # DataLoader warns (at start and at each pass) above the core count, which glowtrain no longer asks for unless
    # it is told the machine has more.
    too_many = len(os.sched_getaffinity(0)) + 1
    more_cpus = ("import glowtrain.loaders, sys; glowtrain.loaders.cpus_per_process = lambda: 64; "
                 "from glowtrain.cli import main; ")
    settings = sets(*TINY, "data.dataset=folder", f"data.root={tmp_path / 'images'}", "data.image_size=8",
                    "data.channels=3",
                    f"data.n_workers={too_many}", "train.batch_size=4", "train.amp=bf16", "train.steps=2",
                    "train.eval_every=2", "train.sample_every=2", "train.checkpoint_every=2")
    args = ["fit", "--out", str(tmp_path / "run"), "--no-progress", *settings]
    done = subprocess.run([sys.executable, "-c", f"{more_cpus}sys.argv = ['glowtrain', *{args!r}]; main()"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line for line in lines if "DataLoader will create" in line] == [
        next(line for line in lines if line.startswith("warning (torch): This DataLoader will create"))]
    assert sum(line.startswith("warning: train.amp=bf16 on a CPU") for line in lines) == 1
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr, done.stderr


@pytest.mark.parametrize("debug, line", [(False, "warning (torch): No CUDA runtime is found\n"),
                                         (True, "cpp_extension.py")])
def test_torchs_log_lines_read_as_warnings_unless_debugging(debug, line):
    script = ("import logging\nfrom glowtrain.cli import commands\n"
              f"commands._root(version=None, debug={debug})\n"  # what every command does before it imports torch
              "import torch.utils.cpp_extension\n"
              "logging.getLogger('torch._inductor').error('autotune choice failed')\n"
              "logging.getLogger('torch.utils.cpp_extension').warning('No CUDA runtime is found')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_LOGS_FORMAT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    if debug:
        assert line in done.stderr  # torch's own form, with its source line
    else:  # (importing cpp_extension may say the same of the machine's own CUDA_HOME first)
        lines = done.stderr.splitlines()
        assert done.stderr.endswith(line) and lines[-2] == "error (torch): autotune choice failed"
        assert all(t.startswith("warning (torch): ") for t in lines[:-2])


CPU_OUT_OF_MEMORY = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 40000000000 bytes. Error code 12")
GPU_OUT_OF_MEMORY = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 79.10 GiB of which 1.2 GiB is free. Including non-PyTorch ...")


@pytest.mark.parametrize("error,command,line", [
    (CPU_OUT_OF_MEMORY, ["info", "--set", "model.hidden_channels=100000"],
     "error: out of CPU memory (it asked for 37.25 GiB more) — lower model.hidden_channels or model.n_steps"),
    (GPU_OUT_OF_MEMORY, ["eval", "--run", "somewhere"],
     "error: out of GPU memory (it asked for 2.00 GiB more) — pass a smaller --batch-size"),
    (GPU_OUT_OF_MEMORY, ["reconstruct", "--run", "somewhere"],
     "error: out of GPU memory (it asked for 2.00 GiB more) — ask for fewer images (--n, --pairs)"),
    (GPU_OUT_OF_MEMORY, ["fit"], "error: out of GPU memory (it asked for 2.00 GiB more) — lower train.batch_size "
     "(train.eval_batch_size or train.init_batch_size if it ran out evaluating or starting), model.hidden_channels "
     "or model.n_steps, or set train.memory_saving=true"),
])
def test_running_out_of_memory_is_one_line_naming_what_shrinks_it(monkeypatch, capsys, error, command, line):
    import glowtrain.analysis as analysis
    from glowtrain.cli import commands

    def too_large(*args, **kwargs):
        raise error

    monkeypatch.setattr(analysis, "info_summary", too_large)
    monkeypatch.setattr(commands, "_open", too_large)
    monkeypatch.setattr(training, "train", too_large)
    assert _run_main(monkeypatch, capsys, *command) == (1, "", line + "\n")


def test_ctrl_c_before_a_command_takes_over_still_says_interrupted(monkeypatch, capsys):
    import types

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C came now

    from glowtrain.cli import commands

    monkeypatch.setattr(commands, "_open", pressed)  # inside the command: its own line, said once
    assert _run_main(monkeypatch, capsys, "eval", "--run", "nowhere") == (130, "", "interrupted\n")
    starting = types.ModuleType("glowtrain.train")  # before the command took over: while it imports torch
    starting.__getattr__ = pressed
    monkeypatch.setitem(sys.modules, "glowtrain.train", starting)
    assert _run_main(monkeypatch, capsys, "eval", "--run", "nowhere") == (130, "", "interrupted\n")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_kill_or_a_closed_terminal_ends_a_command_as_ctrl_c_does(monkeypatch, capsys, name):
    """Before fit's trainer takes them over (its start-up can be long: a large folder's check) and in every other
    command, SIGTERM and SIGHUP ended the process at once with no word and no clean-up."""
    import signal

    from glowtrain.cli import commands

    if not hasattr(signal, name):
        pytest.skip(f"no {name} here")

    def signalled(*args, **kwargs):
        if signal.getsignal(getattr(signal, name)) in (signal.SIG_DFL, signal.SIG_IGN):  # it would end pytest
            raise AssertionError(f"{name} is left to its default")
        os.kill(os.getpid(), getattr(signal, name))  # Python runs its handler before the next line
        raise AssertionError(f"{name} was not handled")

    monkeypatch.setattr(commands, "_open", signalled)
    assert _run_main(monkeypatch, capsys, "eval", "--run", "nowhere") == (130, "", "interrupted\n")
    monkeypatch.setattr(training, "fit_config", signalled)
    assert _run_main(monkeypatch, capsys, "fit", "--set", "train.steps=1") == (130, "", "interrupted\n")


def test_a_signal_ignored_when_the_command_started_stays_ignored_and_none_is_left_handled_after(monkeypatch, capsys):
    """`nohup glowtrain ...` ignores SIGHUP so that the command outlives its terminal: the command and its trainer
    took it over and stopped when the terminal closed. After the command, a late SIGTERM broke into exit
    handlers with a traceback."""
    import signal

    from glowtrain.cli import commands, process
    from glowtrain.train import _StopFlag

    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP here")
    during = {}

    def looking(*args, **kwargs):
        during.update({sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)})
        with _StopFlag():
            during["training"] = signal.getsignal(signal.SIGHUP)
        raise UserError("looked")

    after = {}
    restore = process.default_stop_signals

    def restoring():  # what main leaves for the rest of the process (_run_main then puts pytest's back)
        restore()
        after.update({sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)})

    monkeypatch.setattr(commands, "_open", looking)
    monkeypatch.setattr(process, "default_stop_signals", restoring)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert _run_main(monkeypatch, capsys, "eval", "--run", "x")[0] == 2
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert during[signal.SIGHUP] == during["training"] == signal.SIG_IGN  # nohup's wish kept throughout
    assert during[signal.SIGTERM] == process._interrupt
    assert after == {signal.SIGHUP: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}  # _end: ignored on the way out


def test_the_entry_point_keeps_exit_codes_help_and_our_own_errors(monkeypatch, capsys):
    assert _run_main(monkeypatch, capsys, "--version")[:2] == (0, f"glowtrain {__version__}\n")
    code, out, _ = _run_main(monkeypatch, capsys, "--help")
    assert code == 0 and "sample" in out
    code, out, _ = _run_main(monkeypatch, capsys)  # no arguments: the help, as a usage error
    assert code == 2 and "sample" in out
    code, _, err = _run_main(monkeypatch, capsys, "info", "--config", "missing.yaml")
    assert code == 2 and err == "error: config file not found: missing.yaml — pass an existing YAML file to --config\n"


@pytest.mark.slow
def test_python_dash_m_glowtrain_runs_the_cli_in_a_real_process(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "glowtrain", "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "fit" in help_run.stdout and "sample" in help_run.stdout
    version_run = subprocess.run([sys.executable, "-m", "glowtrain", "--version"], capture_output=True, text=True,
                                 cwd=tmp_path, timeout=120)
    assert version_run.returncode == 0, version_run.stderr
    assert version_run.stdout.strip() == f"glowtrain {__version__}"
    assert list(tmp_path.iterdir()) == []  # neither wrote anything


# ---------------------------------------------------------------------------- fit and sample


def test_fit_trains_into_out_and_says_where_everything_is(fitted):
    _, run_dir, result = fitted
    assert result.exit_code == 0, result.output
    assert f"run directory:  {run_dir}" in result.stdout
    assert f"tensorboard --logdir {run_dir}/tb" in result.stdout
    assert "test bpd " in result.stdout and "at step 4" in result.stdout
    assert RunDir(run_dir).last.is_file() and RunDir(run_dir).config.is_file()


def test_the_paths_fit_prints_paste_into_a_shell_even_with_spaces(tmp_path):
    import shlex

    run_dir = tmp_path / "my run"
    result = tiny_fit(run_dir)
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in result.stdout.splitlines() if ":" in line}
    assert shlex.split(lines["run directory"]) == [str(run_dir)]
    assert shlex.split(lines["checkpoints"])[0] == str(run_dir / "checkpoints" / "last.pt")
    assert shlex.split(lines["tensorboard"]) == ["tensorboard", "--logdir", str(run_dir / "tb")]


def sample_pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def test_fit_without_arguments_trains_the_digits_default_into_runs_digits(tmp_path, monkeypatch):
    """Spline couplings with a learned dequantiser: the default's model, cut to two steps to stay quick."""
    seen, real_train = [], training.train

    def two_steps(cfg, **kwargs):
        seen.append(cfg)
        short = ["run.device=cpu", "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
                 "train.sample_every=2", "train.checkpoint_every=2", "train.n_samples=4"]
        return real_train(apply_overrides(cfg, short), **kwargs)

    monkeypatch.setattr(training, "train", two_steps)
    monkeypatch.chdir(tmp_path)
    result = invoke("fit")
    assert result.exit_code == 0, result.output
    assert seen == [default_config()] and "test bpd" in result.output
    state = load_checkpoint(RunDir(tmp_path / "runs" / "digits").last)
    model = state["config"]["model"]
    assert (model["coupling"], model["dequantization"], state["step"]) == ("spline", "variational", 2)
    assert any(name.startswith("dequantizer.") for name in state["objective"])  # the noise flow's trained weights


def test_sample_writes_one_grid_per_temperature_and_is_reproducible_by_seed(fitted, tmp_path):
    _, run_dir, _ = fitted
    args = ["sample", "--run", str(run_dir), "--temp", "0", "--temp", "0.7", "--n", "4"]
    first = invoke(*args, "--seed", "3", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    pngs = sample_pngs(tmp_path / "a")
    assert sorted(pngs) == ["sample_step0000004_t0p00_seed3_n4.png", "sample_step0000004_t0p70_seed3_n4.png"]
    assert first.stdout.split() == [str(tmp_path / "a" / name) for name in sorted(pngs)]
    for name in pngs:
        with Image.open(tmp_path / "a" / name) as image:
            assert image.size == (152, 152)  # 2x2 grid of 8x8 with 1-pixel padding, upscaled 8x

    again = invoke(*args, "--seed", "3", "--out", str(tmp_path / "b"))
    assert again.exit_code == 0 and sample_pngs(tmp_path / "b") == pngs

    other = invoke(*args, "--seed", "4", "--out", str(tmp_path / "c"))
    assert other.exit_code == 0
    other_pngs = sample_pngs(tmp_path / "c")
    # T=0 draws no noise, so only the T=0.7 grid depends on the seed.
    assert other_pngs["sample_step0000004_t0p00_seed4_n4.png"] == pngs["sample_step0000004_t0p00_seed3_n4.png"]
    assert other_pngs["sample_step0000004_t0p70_seed4_n4.png"] != pngs["sample_step0000004_t0p70_seed3_n4.png"]


def test_sample_without_run_uses_the_most_recent_run_under_runs(fitted, tmp_path, monkeypatch):
    root, run_dir, _ = fitted
    explicit = invoke("sample", "--run", str(run_dir), "--n", "4", "--seed", "5", "--out", str(tmp_path / "x"))
    monkeypatch.chdir(root)
    implicit = invoke("sample", "--n", "4", "--seed", "5", "--out", str(tmp_path / "y"))
    assert explicit.exit_code == 0 and implicit.exit_code == 0, implicit.output
    assert sample_pngs(tmp_path / "y") == sample_pngs(tmp_path / "x") != {}


def test_sample_defaults_to_the_run_samples_folder(fitted, tmp_path):
    _, run_dir, _ = fitted
    result = invoke("sample", "--run", str(run_dir), "--n", "1", "--seed", "11")
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.strip())
    assert written.parent == RunDir(run_dir).samples and written.name.endswith("_seed11_n1.png")
    written.unlink()  # leave the shared run as the other tests expect it


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args,needle", [
    (["--set", "train.lrate=1"], "train.lr"),
    (["--set", "train.lr=abc"], "train.lr"),
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--set", "data.image_size=10"], "divisible"),
    (["--set", "train.lr"], "malformed override"),
], ids=["unknown-key", "bad-float", "missing-config", "indivisible-size", "malformed"])
def test_config_errors_exit_2_with_one_line_and_create_no_run(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = invoke("fit", "--no-progress", *args)
    assert_one_line_error(result, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_fit_on_cuda_without_cuda_exits_2_naming_cuda(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(tmp_path)
    result = invoke("fit", "--no-progress", "--set", "run.device=cuda")
    assert_one_line_error(result, 2, "CUDA")
    assert list(tmp_path.iterdir()) == []


def test_fit_into_an_existing_run_exits_2_and_suggests_resume(fitted):
    _, run_dir, _ = fitted
    before = RunDir(run_dir).metrics.read_text()
    result = invoke("fit", "--no-progress", "--out", str(run_dir), *sets("run.device=cpu", *TINY))
    assert_one_line_error(result, 2, "--resume auto")
    assert RunDir(run_dir).metrics.read_text() == before


def test_resuming_another_runs_checkpoint_into_a_directory_that_holds_a_run_is_refused(fitted, tmp_path):
    """--resume PATH --out DIR: DIR's config, metrics and best.pt would mix with the resumed run's."""
    _, run_dir, _ = fitted
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    before = {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()}
    result = invoke("fit", "--no-progress", "--resume", str(RunDir(run_dir).last), "--out", str(other))
    assert_one_line_error(result, 2, f"{other} already holds another run", "choose an empty --out",
                          f"copy it into {RunDir(other).checkpoints} and resume from there")
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    # Continuing from a checkpoint inside the run itself (best.pt, say) stays allowed.
    own = invoke("fit", "--no-progress", "--resume", str(RunDir(other).best), "--out", str(other),
                 *sets("train.steps=5"))
    assert own.exit_code == 0, own.output


def test_resume_without_a_checkpoint_exits_2(tmp_path, fitted):
    result = invoke("fit", "--no-progress", "--resume", "auto", "--out", str(tmp_path / "none"))
    assert_one_line_error(result, 2, "nothing to resume")
    assert not (tmp_path / "none").exists()
    typo = invoke("fit", "--no-progress", "--resume", "atuo", "--out", str(tmp_path / "none"))
    assert_one_line_error(typo, 2, "--resume atuo: no such checkpoint or run — pass auto, if-any, a run directory "
                          "or a .pt file")
    missing = invoke("fit", "--no-progress", "--resume", str(tmp_path / "old.pt"), "--out", str(tmp_path / "none"))
    assert assert_one_line_error(missing, 2) == f"error: --resume {tmp_path / 'old.pt'}: no such checkpoint file — " \
                                                "check the path"  # and no run at --out to continue instead
    _, run_dir, _ = fitted
    mistyped = invoke("fit", "--no-progress", "--resume", str(tmp_path / "old.pt"), "--out", str(run_dir))
    assert assert_one_line_error(mistyped, 2) == (f"error: --resume {tmp_path / 'old.pt'}: no such checkpoint file "
                                                  f"— check the path, or pass auto to continue {run_dir}'s own")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("args,needle", [
    (["--temp", "-1"], "temperatures must be >= 0"),
    (["--n", "0"], "--n must be at least 1"),
    (["--checkpoint", "nope.pt"], "nope.pt"),
    (["--run", "nowhere"], "nowhere"),
    ([], "no finished run"),
    (["--temp", ""], "--temp got no number ('')"),
    (["--temp", ",", "--grid"], "--temp got no number (',')"),
    (["--temp", "0.7,,1"], "--temp has an empty item in '0.7,,1' (a number left out?) — give values like 0.5,0.7"),
], ids=["negative-temp", "zero-n", "missing-checkpoint", "missing-run", "no-runs", "empty-temp", "comma-temp",
        "empty-item"])
def test_sample_errors_exit_2_with_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = invoke("sample", *args)
    assert_one_line_error(result, 2, needle)
    assert list(tmp_path.iterdir()) == []


def test_manipulate_with_an_empty_alpha_list_exits_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("manipulate", "--alphas", " , ")
    assert_one_line_error(result, 2, "--alphas got no number", "like -1,0,1,2")
    assert list(tmp_path.iterdir()) == []


def test_sample_from_a_config_file_instead_of_a_checkpoint_exits_2(fitted):
    _, run_dir, _ = fitted
    result = invoke("sample", "--checkpoint", str(RunDir(run_dir).config))
    assert_one_line_error(result, 2, "config.yaml")


def test_prepare_writes_a_cache_that_fit_trains_from(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    data = ["data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "data.channels=3", "data.image_size=8",
            "model.n_levels=2"]
    cache = tmp_path / "my cache"
    result = invoke("prepare", *sets(*data), "--out", str(cache), "--no-progress")
    assert result.exit_code == 0, result.output
    n_train, n_test = (np.load(cache / f"{split}.npy").shape[0] for split in ("train", "test"))
    assert n_train + n_test == 40 and np.load(cache / "train.npy").shape[1:] == (3, 8, 8)
    assert f"cached {n_train} train and {n_test} test images" in result.stdout
    assert f"data: folder {tmp_path / 'imgs'}: 40 images found, {n_train} train / {n_test} test" in result.stdout
    suggested = shlex.split(result.stdout.split("train from it with: ")[1].splitlines()[0])  # as a shell reads it
    assert suggested == ["--set", f"data.cache={cache}"]
    result = invoke("fit", "--out", str(tmp_path / "run"), "--no-progress", *suggested,
                    *sets(*TINY, *data, "train.batch_size=8", "train.init_batch_size=8"))
    assert result.exit_code == 0, result.output
    assert "test bpd" in result.stdout
    # Keys that decide which images a cache holds, when not the defaults, are in the suggestion: without them
    # fit would refuse the cache.
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    result = invoke("prepare", *sets(*data, "data.on_bad_image=skip", "data.split_seed=3"), "--out",
                    str(tmp_path / "cache2"), "--no-progress")
    suggested = shlex.split(result.stdout.split("train from it with: ")[1].splitlines()[0])
    assert suggested == ["--set", f"data.cache={tmp_path / 'cache2'}", "--set", "data.split_seed=3",
                         "--set", "data.on_bad_image=skip"]
    result = invoke("fit", "--out", str(tmp_path / "run2"), "--no-progress", *sets(*TINY, *data,
                    "train.batch_size=8", "train.init_batch_size=8"), *suggested)
    assert result.exit_code == 0, result.output


def test_prepare_into_the_current_folder_writes_the_cache_there(tmp_path, monkeypatch):
    import numpy as np

    (tmp_path / "cache").mkdir()
    monkeypatch.chdir(tmp_path / "cache")
    result = invoke("prepare", "--out", ".", "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"data.cache={tmp_path / 'cache'}" in result.stdout
    assert np.load(tmp_path / "cache" / "test.npy").shape == (297, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing left beside it


def test_prepare_refuses_a_config_that_already_reads_a_cache(tmp_path):
    result = invoke("prepare", *sets("data.cache=somewhere"), "--out", str(tmp_path / "c"))
    assert_one_line_error(result, 2, "data.cache is set")


def test_resume_if_any_starts_fresh_then_continues(tmp_path):
    run_dir = tmp_path / "run"
    first = invoke("fit", "--out", str(run_dir), "--no-progress", "--resume", "if-any", *sets(*TINY))
    assert first.exit_code == 0, first.output
    second = invoke("fit", "--out", str(run_dir), "--no-progress", "--resume", "if-any", *sets(*TINY, "train.steps=6"))
    assert second.exit_code == 0, second.output
    assert "at step 6" in second.stdout


def test_debug_flag_shows_the_traceback_for_bad_input(tmp_path):
    result = invoke("--debug", "fit", "--out", str(tmp_path / "run"), *sets("train.lrate=1"))
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "did you mean 'train.lr'" in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- issue 14


@pytest.mark.parametrize("override", ["train.lr=1", "train.bogus=1"])
def test_info_run_with_set_is_refused_not_silently_ignored(fitted, override):
    _, run_dir, _ = fitted
    result = invoke("info", "--run", str(run_dir), "--set", override)
    assert_one_line_error(result, 2, "--set does not apply to --run", str(run_dir / "config.yaml"))


def tiny_fit(out, *extra, resume=False):
    return invoke("fit", "--out", out, "--no-progress", *(["--resume", "auto"] if resume else []),
                  *sets(*TINY, *extra))


def test_fit_and_sample_refuse_an_out_among_another_runs_own_files(fitted, tmp_path):
    """Written into a run's checkpoints/, samples/ or tb/ (at any depth), a new run's files or pictures would be
    taken for that run's own (TensorBoard reads tb/ to any depth); a run's own samples folder stays open to it."""
    import shutil

    _, run_dir, _ = fitted
    for inside, folder in (("tb", "tb"), ("checkpoints", "checkpoints"), ("samples/new", "samples")):
        refused = tiny_fit(run_dir / inside)
        assert assert_one_line_error(refused, 2) == (
            f"error: --out {run_dir / inside} lies in {run_dir / folder}, a run's own folder, where this run's files "
            "would be taken for that run's — choose an --out outside it")
        assert not (run_dir / inside / "config.yaml").exists()
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.pt").write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes())
    for command in (["sample", "--n", "1"], ["reconstruct", "--n", "1"]):
        refused = invoke(*command, "--run", str(run_dir), "--out", str(other / "samples"))
        assert assert_one_line_error(refused, 2) == (
            f"error: --out {other / 'samples'} lies in {other / 'samples'}, a run's own folder, where the pictures "
            "would be taken for that run's — leave out --out (the default is the run's samples folder) or name a "
            "folder of their own")
    (other / "samples").mkdir()
    (tmp_path / "into_other").symlink_to(other / "samples", target_is_directory=True)  # a link is where it leads
    refused = invoke("sample", "--n", "1", "--run", str(run_dir), "--out", str(tmp_path / "into_other"))
    assert_one_line_error(refused, 2, f"lies in {(other / 'samples').resolve()}, a run's own folder")
    assert not list((other / "samples").iterdir())
    mine, beside = run_dir / "samples" / "mine", run_dir / "pictures"
    try:
        assert invoke("sample", "--run", str(run_dir), "--n", "1", "--out", str(mine)).exit_code == 0
        assert list(mine.glob("*.png"))
        # .. is resolved before asking: run/samples/../pictures is the run's own folder, not its samples/
        ok(invoke("sample", "--run", str(run_dir), "--n", "1", "--out", str(run_dir / "samples" / ".." / "pictures")))
        assert list(beside.glob("*.png"))
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(beside, ignore_errors=True)
    # A run made inside another's folder before this check goes on (only new runs are refused there).
    shutil.copytree(run_dir, other / "tb" / "old", ignore=shutil.ignore_patterns(".fit.lock"))
    ok(tiny_fit(other / "tb" / "old", resume=True))
    # A checkpoint kept in a folder of a run's checkpoints/: its default place beside it is not refused.
    (other / "checkpoints" / "kept").mkdir()
    (other / "checkpoints" / "kept" / "step4.pt").write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes())
    ok(invoke("sample", "--n", "1", "--checkpoint", str(other / "checkpoints" / "kept" / "step4.pt")))
    assert list((other / "checkpoints" / "kept" / "samples").glob("*.png"))


def test_fit_refuses_an_out_that_holds_images_its_sample_grids_would_join(tmp_path):
    from PIL import Image

    pictures = tmp_path / "pictures"
    (pictures / "2024").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(pictures / "2024" / "beach.jpg")
    refused = tiny_fit(pictures)
    assert assert_one_line_error(refused, 2) == (
        f"error: {pictures} holds images of its own, which this run's sample grids would be read with — choose "
        "another --out or run.name (a new or empty folder)")
    assert sorted(path.name for path in pictures.rglob("*")) == ["2024", "beach.jpg"]


def test_resume_says_where_it_continues_from_and_when_there_is_nothing_left(tmp_path):
    run_dir = tmp_path / "run"
    assert tiny_fit(run_dir).exit_code == 0
    longer = tiny_fit(run_dir, "train.steps=6", resume=True)
    assert longer.exit_code == 0, longer.output
    assert f"resuming {run_dir} from step 4 of 6" in longer.stdout
    record = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "data.json")}
    hparams = sorted(path.name for path in (run_dir / "tb").rglob("*"))
    again = tiny_fit(run_dir, "train.steps=6", "train.lr=0.5", "run.seed=7", resume=True)
    assert again.exit_code == 0
    assert f"{run_dir} is already at step 6 of 6 — raise train.steps to continue, e.g. --set train.steps=12" in \
        again.stdout
    # It trained nothing, so the run's record still describes the weights (not lr 0.5 and seed 7).
    assert {name: (run_dir / name).read_bytes() for name in record} == record
    assert sorted(path.name for path in (run_dir / "tb").rglob("*")) == hparams
    shown = invoke("fit", "--out", run_dir, "--resume", "auto", *sets(*TINY, "train.steps=6"))  # progress on
    assert shown.exit_code == 0 and "step/s" not in shown.stderr and "100%" not in shown.stderr, shown.stderr
    lowered = tiny_fit(run_dir, "train.steps=4", resume=True)  # below the step reached: the advice must clear it
    assert f"{run_dir} is already at step 6, past train.steps=4 — raise train.steps above 6 to continue, e.g. " \
           "--set train.steps=12" in lowered.stdout


def test_a_bad_value_on_resume_is_said_against_the_runs_own_config(tmp_path):
    """It offered the default (train.steps=427) for a run trained to 4: the overrides were first read on top of the
    defaults, to find run.name, which --out made needless."""
    run_dir = tmp_path / "run"
    assert tiny_fit(run_dir).exit_code == 0
    for resume in ("auto", "if-any"):
        refused = invoke("fit", "--out", run_dir, "--resume", resume, *sets("train.steps=abc"))
        assert_one_line_error(refused, 2, "train.steps: expected an integer, got 'abc' — use a value like "
                              "train.steps=4 (the config's)")


def test_a_resume_says_when_it_does_not_use_edits_made_to_the_runs_config_yaml(tmp_path):
    run_dir = tmp_path / "run"
    assert tiny_fit(run_dir).exit_code == 0
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("  steps: 4 ", "  steps: 6 "))  # "train longer", by hand
    done = tiny_fit(run_dir, resume=True)
    assert done.exit_code == 0, done.output
    assert f"{run_dir} is already at step 4 of 4" in done.stdout
    assert (f"note: this resume does not use the edits in {config} (train.steps): a resume trains with the config "
            f"its checkpoint keeps (and --set); to use them, resume with --config {config}") in done.stdout
    by_set = tiny_fit(run_dir, "train.steps=6", resume=True)  # the edit's value, given again: used
    assert by_set.exit_code == 0, by_set.output
    assert f"resuming {run_dir} from step 4 of 6" in by_set.stdout and "does not use" not in by_set.stdout

    config.write_text(config.read_text().replace("  lr: ", "  lr: 0.0005  # was "))  # a new lr
    by_config = invoke("fit", "--out", run_dir, "--resume", "auto", "--no-progress", "--config", config,
                       *sets("train.steps=7"))
    assert by_config.exit_code == 0, by_config.output
    assert f"resuming {run_dir} from step 6 of 7" in by_config.stdout and "does not use" not in by_config.stdout
    config.write_text(config.read_text().replace("  lr: 0.0005 ", "  lr: 0.0002 "))
    longer = tiny_fit(run_dir, "train.steps=8", resume=True)
    assert longer.exit_code == 0, longer.output
    kept = run_dir / "config.edited_3.yaml"  # the two before: the steps and the first lr edits, kept as fit wrote
    assert f"kept as {kept}" in longer.stdout and f"does not use the edits in {kept} (train.lr)" in longer.stdout

    # An edit that changes the model cannot be used by --config (it is refused): a new run can.
    config.write_text(config.read_text().replace("  hidden_channels: ", "  hidden_channels: 12  # was "))
    model_edit = tiny_fit(run_dir, "train.steps=9", resume=True)
    kept = run_dir / "config.edited_4.yaml"
    assert (f"note: this resume does not use the edits in {kept} (model.hidden_channels): a resume trains with the "
            f"config its checkpoint keeps (and --set); model.hidden_channels cannot change on resume: train a new "
            f"run with --config {kept} and another --out") in model_edit.stdout
    config.write_text(config.read_text().replace("  spline_bins: ", "  spline_bins: 4  # was "))  # builds nothing
    unused_key = tiny_fit(run_dir, "train.steps=10", resume=True)
    kept = run_dir / "config.edited_5.yaml"
    assert (f"note: this resume does not use the edits in {kept} (model.spline_bins): a resume trains with the config "
            f"its checkpoint keeps (and --set); to use them, resume with --config {kept}") in unused_key.stdout
    config.write_text(config.read_text() + "train: {}\n")  # a section given twice: not a valid config
    broken = tiny_fit(run_dir, "train.steps=11", resume=True)
    kept = run_dir / "config.edited_6.yaml"
    assert f"note: this resume does not use the edits in {kept}: config file {kept} is not valid YAML" in \
        broken.stdout


def test_no_progress_prints_one_plain_line_per_logging_step(tmp_path):
    result = tiny_fit(tmp_path / "run")
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines() if "train bpd" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "\r" not in result.stdout


def test_fit_into_an_unwritable_out_exits_2_with_one_line(tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    result = invoke("fit", "--out", "/proc/glowtrain-run", "--no-progress", *sets(*TINY))
    assert_one_line_error(result, 2, "cannot create the run directory /proc/glowtrain-run")


@pytest.mark.parametrize("no_ema", [False, True])
def test_eval_json_says_which_weights_it_used(fitted, no_ema):
    import json

    _, run_dir, _ = fitted
    result = invoke("eval", "--run", str(run_dir), "--device", "cpu", *(["--no-ema"] if no_ema else []))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ema"] is (not no_ema)


def test_class_count_message_for_a_dataset_without_labels_names_the_way_on(tmp_path):
    import numpy as np

    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), i * 40, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    result = tiny_fit(tmp_path / "run", "data.dataset=folder", f"data.root={tmp_path / 'imgs'}", "model.n_classes=3")
    line = assert_one_line_error(result, 2, "has no classes", "set model.n_classes=0", "data.labels: subfolders")
    assert "(or 0)" not in line


def test_a_failed_download_is_one_line_with_the_absolute_path_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            print("Downloading https://example.invalid/train-images-idx3-ubyte.gz")
            Path(root, "MNIST", "raw").mkdir(parents=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/, got:\n"
                               "<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    monkeypatch.chdir(tmp_path)
    result = invoke("fit", "--config", str(Path(__file__).parent.parent / "configs" / "mnist.yaml"), "--out",
                    tmp_path / "run", "--no-progress", "--set", "run.device=cpu")
    assert_one_line_error(result, 2, f"could not download MNIST into {tmp_path / 'data'}/", str(tmp_path / "data"),
                          "(Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3] Temporary failure "
                          "in name resolution>)")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_new_fit_on_a_root_holding_celebas_layout_itself_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "data" / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    Image.new("RGB", (178, 218)).save(root / "img_align_celeba" / "000001.jpg")
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    result = tiny_fit(tmp_path / "run", "data.dataset=celeba", f"data.root={root}", "data.channels=3")
    assert_one_line_error(result, 2, f"data.root {root} holds CelebA in torchvision's layout",
                          f"set data.root={tmp_path / 'data'} to train on the official split")
    assert not (tmp_path / "run").exists()
    from glowtrain.errors import UserError

    with pytest.raises(UserError, match="holds CelebA"):  # before fit --nproc starts its processes
        training.fit_config(None, ["data.dataset=celeba", f"data.root={root}", "data.channels=3"], None, None)


def test_celeba_without_images_describes_the_expected_layout(tmp_path):
    root = tmp_path / "data"  # the run beside it: a run inside the folder CelebA is read from is refused first
    root.mkdir()
    result = tiny_fit(tmp_path / "run", "data.dataset=celeba", f"data.root={root}", "data.channels=3")
    line = assert_one_line_error(result, 2, f"{root}/celeba/img_align_celeba/", "list_eval_partition.txt")
    assert "data.download" not in line
    result = tiny_fit(tmp_path / "run", "data.dataset=celeba", f"data.root={root}", "data.channels=3",
                      "data.download=true")  # a user may expect it to fetch CelebA: it was silently ignored
    assert_one_line_error(result, 2, f"no CelebA images under {root} (data.download fetches mnist, "
                          "fashion_mnist and cifar10, not CelebA) — put the aligned faces in")


def test_info_run_shows_the_training_state(fitted):
    _, run_dir, _ = fitted
    result = invoke("info", "--run", str(run_dir))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "step: 4" in lines and "steps: 4" in lines
    best = next(line for line in lines if line.startswith("best_test_bpd: "))
    assert float(best.split(": ")[1]) > 0 and any(line.startswith("last_test_bpd: ") for line in lines)


def test_help_shows_plain_flags_without_a_value_and_prepare_says_where_its_cache_goes():
    sample_help = invoke("sample", "--help").output
    assert any("--grid " in line for line in sample_help.splitlines())
    from glowtrain.cli import app

    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        help_text = invoke(name, "--help").output
        # Flags show no value; options show what they take (PATH, N, KEY=VALUE), not a Python type.
        assert not re.search(r"<(bool|str|int|float|list\[\w+\])>", help_text), (name, help_text)
    assert "inside the image folder" in " ".join(invoke("prepare", "--help").output.split())
    # --seed is offered where it changes the output, and nowhere else (eval ... take it and ignore it).
    offering = {name for name in ("sample", "fit", "eval", "reconstruct", "interpolate", "manipulate", "score")
                if "--seed" in invoke(name, "--help").output}
    assert offering == {"sample"}


def test_runs_and_the_latest_run_are_found_in_groups_but_not_in_hidden_folders(fitted, tmp_path, monkeypatch):
    from glowtrain.runs import latest_run

    _, run_dir, _ = fitted
    monkeypatch.chdir(tmp_path)
    for name, mtime in (("sweep/lr3e-4", 1_000_000), ("sweep/lr1e-3", 2_000_000), (".trash/old", 3_000_000),
                        ("a/b/c/too_deep", 4_000_000)):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        last = tmp_path / "runs" / name / "checkpoints" / "last.pt"
        shutil.copy(run_dir / "checkpoints" / "last.pt", last)
        os.utime(last, (mtime, mtime))
    (tmp_path / "runs" / "sweep" / "config.yaml").write_text("train:\n  steps: 100\n")  # the sweep's base config
    listed = ok(invoke("runs"))
    rows = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert rows == ["runs/sweep/lr1e-3", "runs/sweep/lr3e-4"]
    assert listed.stderr == ("note: folders more than 3 levels below runs are not searched, and runs/a/b/c holds some "
                             "— list the runs there with --root runs/a/b/c\n")
    deeper = ok(invoke("runs", "--root", "runs/a/b/c"))
    assert [line.split()[0] for line in deeper.stdout.splitlines()[1:]] == ["runs/a/b/c/too_deep"] and not deeper.stderr
    assert latest_run().path == Path("runs/sweep/lr1e-3")  # not the newer one in a hidden folder
    evaluated = json.loads(ok(invoke("eval", "--device", "cpu", "--no-progress")).stdout)
    assert evaluated["checkpoint"] == str(Path("runs/sweep/lr1e-3/checkpoints/last.pt"))


def test_runs_lists_each_run_with_step_best_bpd_and_status(fitted, tmp_path, monkeypatch):
    root, run_dir, _ = fitted
    monkeypatch.chdir(root)
    (root / "runs" / "empty").mkdir(exist_ok=True)
    RunDir(root / "runs" / "empty").write_config(default_config())  # a run that has not saved a checkpoint yet
    result = invoke("runs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "step", "best", "test", "bpd", "status"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["runs/tiny"][1] == "4/4" and float(rows["runs/tiny"][2]) > 0 and rows["runs/tiny"][3] == "finished"
    assert rows["runs/empty"][1:] == ["-", "-", "no", "checkpoint", "yet"]
    (root / "runs" / "empty" / "config.yaml").unlink()
    (root / "runs" / "empty").rmdir()
    monkeypatch.chdir(tmp_path)
    assert "no runs under" in invoke("runs").stdout  # before the first run, runs/ is simply not there yet
    assert assert_one_line_error(invoke("runs", "--root", "rusn"), 2) == (
        "error: --root rusn: no such folder — pass the folder that holds your runs (default: runs)")
    (tmp_path / "runs").write_text("a file of the user's")
    for args in ((), ("--root", "runs")):
        assert assert_one_line_error(invoke("runs", *args), 2) == (
            "error: --root runs: a file, not a folder — pass the folder that holds your runs (default: runs)")
    (tmp_path / "runs").unlink()
    assert assert_one_line_error(invoke("runs", "--root", run_dir), 2) == (
        f"error: --root {run_dir} is a run directory, not a folder of runs — pass the folder that holds it (--root "
        f"{run_dir.parent}), or see this run with: glowtrain info --run {run_dir}")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    assert assert_one_line_error(invoke("sample", "--run", checkpoint, "--out", tmp_path / "s"), 2) == (
        f"error: --run takes a run directory, and {checkpoint} is a file — pass its run directory: --run {run_dir} "
        f"or the file as --checkpoint {checkpoint}")
    # info takes no --checkpoint: it is offered the run directory the checkpoint belongs to
    assert assert_one_line_error(invoke("info", "--run", checkpoint), 2) == (
        f"error: --run takes a run directory, and {checkpoint} is a file — pass its run directory: --run {run_dir}")
    config = run_dir / "config.yaml"  # not a checkpoint: only its run is offered
    assert assert_one_line_error(invoke("sample", "--run", config, "--out", tmp_path / "s"), 2) == (
        f"error: --run takes a run directory, and {config} is a file — pass its run directory: --run {run_dir}")
    (tmp_path / "notes.txt").write_text("mine")
    assert assert_one_line_error(invoke("eval", "--run", tmp_path / "notes.txt"), 2).endswith(
        "is a file — pass a directory made by 'glowtrain fit'")
    assert assert_one_line_error(invoke("eval", "--checkpoint", run_dir), 2) == (
        f"error: --checkpoint takes a checkpoint file, and {run_dir} is a folder — pass it as --run {run_dir}")
    assert assert_one_line_error(invoke("eval", "--checkpoint", tmp_path), 2).endswith(
        "is a folder — pass a .pt file")
    assert assert_one_line_error(invoke("eval", "--run", run_dir, "--data", config), 2) == (
        f"error: --data {config}: a file, not a folder — pass the folder holding the run's images, its dataset root, "
        "or its prepared cache")
    line = assert_one_line_error(invoke("reconstruct", "--run", run_dir, "--n", "400", "--out", tmp_path / "r"), 2)
    assert line.endswith("the test split has 297 — use --n 297 or less")
    line = assert_one_line_error(invoke("interpolate", "--run", run_dir, "--pairs", "200", "--steps", "2", "--out",
                                        tmp_path / "i"), 2)
    assert line.endswith("the test split has 297 — use --pairs 148 or less")


def test_max_time_stops_cleanly_with_a_checkpoint_and_the_resume_command(tmp_path, monkeypatch):
    from glowtrain.train import Trainer

    monkeypatch.setattr(Trainer, "_now", lambda self: 10.0 * self.state.step)  # a clock of 10 s per step
    run_dir = tmp_path / "run"
    result = tiny_fit(run_dir, "train.max_time=25s", "train.steps=8", "train.log_every=1", "train.eval_every=2")
    assert result.exit_code == 0, result.output
    assert "stopped at step 3 of 8: train.max_time (25s) is used up; checkpoint saved" in result.stdout
    test_line = re.search(r"^test bpd \S+ at step (\d+)$", result.stdout, re.M)
    assert test_line and test_line.group(1) == "2"  # when it was measured, not where the run stopped
    assert (f"Continue with: glowtrain fit --resume auto --out {run_dir} (it stops after 25s again: the run keeps "
            "its max_time; --set train.max_time='' lifts it)\n") in result.stdout
    assert torch.load(RunDir(run_dir).last, weights_only=True)["step"] == 3
    early = tiny_fit(tmp_path / "early", "train.max_time=15s", "train.steps=8", "train.eval_every=5",
                     "train.sample_every=5")  # stopped at step 2, before anything was evaluated or drawn
    assert "stopped at step 2 of 8" in early.stdout and "test bpd" not in early.stdout
    assert "last.pt (no best.pt yet: it stopped before an evaluation)" in early.stdout
    assert "samples:" not in early.stdout and not RunDir(tmp_path / "early").samples.exists()


def test_a_diverged_run_says_it_has_no_best_checkpoint_and_eval_prints_strict_json(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"images sampled at temperature (0.7|1) are not finite") as said:
        result = tiny_fit(run_dir, "train.lr=1e9", "train.warmup_steps=0", "train.steps=2", "train.eval_every=2")
    assert result.exit_code == 0, result.output
    assert len([w for w in said if "not finite" in str(w.message)]) == 2  # the sample grids of both temperatures
    assert "test bpd nan at step 2" in result.stdout and not RunDir(run_dir).best.exists()
    assert "last.pt (no best.pt: no evaluation gave a finite test bpd)" in result.stdout
    evaluated = invoke("eval", "--run", run_dir, "--device", "cpu", "--no-progress")
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stderr.strip() == ("warning: not finite, so printed as null: bpd, bpd_stderr — the weights may "
                                        "have diverged")
    printed = json.loads(evaluated.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert printed["bpd"] is None and printed["bpd_stderr"] is None and printed["n_images"] == 297


def test_a_run_that_diverges_twice_ends_with_one_line_naming_the_cause_and_exit_1(tmp_path):
    result = tiny_fit(tmp_path / "run", "train.lr=1e9", "train.warmup_steps=0", "train.max_bad_steps=1",
                      "train.log_every=1", "train.steps=6")
    line = assert_one_line_error(result, 1, "there is no checkpoint to roll back to yet: lower train.lr")
    assert line.startswith("error: training diverged: 2 steps in a row up to step 3 had a non-finite loss")


def test_strict_json_nulls_every_non_finite_float_however_deep():
    from glowtrain.logs import strict_json

    value = {"bpd": math.nan, "sets": {"a": {"mean": -math.inf, "n": 3}}, "bpds": [1.5, math.inf], "name": "x"}
    assert strict_json(value) == {"bpd": None, "sets": {"a": {"mean": None, "n": 3}}, "bpds": [1.5, None],
                                  "name": "x"}


def test_a_finished_run_names_its_best_checkpoint(fitted):
    assert "checkpoints/last.pt (and best.pt)" in fitted[2].stdout


def test_tensorboard_holds_one_hparams_session_with_the_key_settings_updated_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert tiny_fit(run_dir).exit_code == 0
    assert tiny_fit(run_dir, "train.steps=8", resume=True).exit_code == 0
    tb = RunDir(run_dir).tb
    sessions = list((tb / "hparams").iterdir())
    assert len(sessions) == 1
    events = EventAccumulator(str(tb / "hparams")).Reload()
    plugin = events.PluginTagToContent("hparams")
    assert set(plugin) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert {"n_bits", "image_size", "seed", "n_levels", "lr"} <= set(start.session_start_info.hparams)
    (best,) = events.Scalars("hparam/best_test_bpd")
    best_logged = min(json.loads(line)["bpd"] for line in RunDir(run_dir).metrics.read_text().splitlines()
                      if json.loads(line)["split"] == "test")
    assert best.value == pytest.approx(best_logged) and best.step == 8
    n_files = len(list(tb.glob("events.*")))
    assert tiny_fit(run_dir, "train.steps=8", resume=True).exit_code == 0  # nothing left to do: no new file
    assert len(list(tb.glob("events.*"))) == n_files
    # The batch shown is the global one, so runs that train alike (2 processes of 8, 1 of 16) show alike.
    from glowtrain.logs import write_hparams

    cfg = apply_overrides(default_config(), ["train.batch_size=8", "train.grad_accum_steps=2"])
    write_hparams(RunDir(run_dir), cfg, 1.0, 8, processes=2)
    plugin = EventAccumulator(str(tb / "hparams")).Reload().PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["batch_size"].number_value == 32


def test_every_command_that_reads_a_run_takes_no_progress():
    """Scripts pass --no-progress to each command they run; one that refused it would break them."""
    import typer

    commands = typer.main.get_command(app).commands
    reading = {name for name, command in commands.items() if any(p.name == "run" for p in command.params)}
    assert {"sample", "eval", "reconstruct", "interpolate", "manipulate", "score"} <= reading
    assert {name for name in reading if not any("--no-progress" in p.secondary_opts for p in commands[name].params
                                                if hasattr(p, "secondary_opts"))} == {"info"}


def test_output_to_a_hung_up_terminal_is_dropped_and_the_work_goes_on(tmp_path):
    """After a closed ssh session's SIGHUP, writing to its terminal fails with EIO: the run saves instead of
    ending on the next line it prints."""
    import errno

    from glowtrain.cli.process import OutputThatOutlivesItsReader

    class HungUp:
        def __init__(self, file):
            self.file, self.calls = file, 0

        def write(self, text):
            self.calls += 1
            raise OSError(errno.EIO, "Input/output error")

        def fileno(self):
            return self.file.fileno()

    with open(tmp_path / "tty", "w") as file:
        output = OutputThatOutlivesItsReader(HungUp(file))
        assert output.write("step 70/200: train bpd 2.31\n") == len("step 70/200: train bpd 2.31\n")
        assert output.stream.calls == 1

        class Full(HungUp):
            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

        with pytest.raises(OSError, match="No space left"):  # other failures are not hidden
            OutputThatOutlivesItsReader(Full(file)).write("x")


@pytest.mark.parametrize("command, default", [
    (["fit"], "runs/<run.name>"), (["sample"], "<run>/samples"), (["reconstruct"], "<run>/samples"),
    (["interpolate"], "<run>/samples"), (["manipulate", "--from-class", "3", "--to-class", "5"], "<run>/samples"),
    (["score", "--dataset", "digits"], "<run>/score"), (["prepare"], "<data.root>/glowtrain-cache-"),
])
def test_an_empty_out_is_refused_not_read_as_the_default_place(tmp_path, monkeypatch, command, default):
    """`fit --out "$OUT"` with OUT unset trained (or resumed) runs/digits; a picture went to <run>/samples."""
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(invoke(*command, "--out", ""), 2, "--out was given an empty path")
    assert f"leave --out out for {default}" in line
    assert list(tmp_path.iterdir()) == []
