"""Faults that must lose nothing: signals during fit, a kill during a save, unwritable outputs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import GLOW_LAYERS

from glowtrain.checkpoint import load_checkpoint, save_checkpoint
from glowtrain.config import apply_overrides, default_config
from glowtrain.errors import UserError
from glowtrain.train import train

TINY = [*GLOW_LAYERS, "model.n_levels=2", "model.n_steps=1", "model.hidden_channels=8", "train.batch_size=16",
        "train.init_batch_size=32", "train.eval_batch_size=300", "train.warmup_steps=5", "train.log_every=1",
        "train.eval_every=1000", "train.sample_every=1000", "train.checkpoint_every=1000", "train.n_samples=1",
        "train.sample_temperatures=[0]"]
pytestmark = pytest.mark.slow  # real `glowtrain fit` processes, signals and kills

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(condition, process, timeout=120.0):
    """Poll a condition on files the child writes (no fixed sleeps: returns as soon as it holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"child exited early with {process.returncode}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.02)


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return [m["step"] for m in lines if m["split"] == "train" and "bpd" in m]


def _hangup_as_from_a_terminal() -> None:
    """The child starts with SIGHUP's default, as from a terminal, also when the suite runs under nohup (glowtrain
    keeps an ignored SIGHUP ignored)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _fit(run_dir: Path, steps: int, *extra: str, wait: bool = True, own_group: bool = False):
    sets = [arg for item in TINY + [f"train.steps={steps}"] for arg in ("--set", item)]
    child = subprocess.Popen([sys.executable, "-m", "glowtrain", "fit", "--out", str(run_dir), "--no-progress",
                              *sets, *extra], cwd=run_dir.parent, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=own_group,
                             preexec_fn=_hangup_as_from_a_terminal if hasattr(signal, "SIGHUP") else None)
    if wait:
        _, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr
    return child


def _interrupt(run_dir: Path, sig) -> tuple[int, str]:
    """Start a long fit, signal it once a few steps are logged; return the saved step and stderr."""
    child = _fit(run_dir, 400, wait=False)
    _wait_for(lambda: len(_logged_steps(run_dir / "metrics.jsonl")) >= 3, child)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "glowtrain fit --resume auto --out" in stderr and "Traceback" not in stderr
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"]
    assert 3 <= stopped_at < 400
    assert _logged_steps(run_dir / "metrics.jsonl")[-1] == stopped_at  # nothing logged past the saved step
    return stopped_at, stderr


def test_sigterm_during_fit_saves_exits_130_and_resume_equals_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "run"
    stopped_at, _ = _interrupt(run_dir, signal.SIGTERM)
    # Every run in a child with the same thread count: float sums then add up in the same order.
    total = stopped_at + 4
    _fit(run_dir, total, "--resume", "auto")
    _fit(tmp_path / "straight", total)
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert _logged_steps(run_dir / "metrics.jsonl") == list(range(1, total + 1))  # no gaps, no duplicates


@pytest.mark.parametrize("sig", ["SIGINT", "SIGHUP"])
def test_ctrl_c_or_a_closed_terminal_during_fit_saves_and_exits_130(tmp_path, sig):
    """SIGHUP (an ssh session closed without tmux or nohup) ended the process at once: the steps since the last
    checkpoint were lost."""
    if not hasattr(signal, sig):
        pytest.skip(f"no {sig} here")
    _interrupt(tmp_path / "run", getattr(signal, sig))


def test_sigterm_to_the_whole_process_group_with_data_workers_still_saves_and_exits_130(tmp_path):
    """torchrun and batch schedulers signal every process of a job, DataLoader workers included: the workers
    must outlive the signal so that the trainer can finish its step and save."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    run_dir = tmp_path / "run"
    folder = ["data.dataset=folder", f"data.root={images}", "data.n_workers=2", "train.eval_batch_size=8"]
    child = _fit(run_dir, 400, *[a for s in folder for a in ("--set", s)], wait=False, own_group=True)
    _wait_for(lambda: len(_logged_steps(run_dir / "metrics.jsonl")) >= 3, child)
    os.killpg(child.pid, signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "glowtrain fit --resume auto --out" in stderr and "Traceback" not in stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= 3


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "step": 1}, path)
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import pathlib, sys, torch
        from glowtrain import checkpoint
        real_save = torch.save
        def slow_save(obj, f):
            f.write(b"PK-partial-bytes" * 1000)
            f.flush()
            pathlib.Path({str(marker)!r}).touch()
            sys.stdin.read()  # block until killed
        checkpoint.torch.save = slow_save
        checkpoint.save_checkpoint({{"model": {{"w": torch.ones(3)}}, "config": {{}}, "step": 2}},
                                   pathlib.Path({str(path)!r}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=ENV, text=True)
    _wait_for(marker.exists, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(3))


def test_run_directory_under_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = apply_overrides(default_config(), TINY + ["train.steps=2"])
    with pytest.raises(UserError, match="is a file — choose another --out"):
        train(cfg, out=str(blocker / "run"), progress=False)
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so permissions cannot be tested")
def test_run_directory_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = apply_overrides(default_config(), TINY + ["train.steps=2"])
        with pytest.raises(UserError, match="permission denied"):
            train(cfg, out=str(locked / "run"), progress=False)
    finally:
        locked.chmod(0o700)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    child = _fit(run_dir, 100000, "--set", "train.eval_every=50", "--set", "train.eval_batch_size=1", wait=False)
    _wait_for(lambda: len(_logged_steps(run_dir / "metrics.jsonl")) >= 3, child)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
