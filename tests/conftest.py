import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Subprocesses (python -m glowtrain, torchrun, scripts) must find this checkout from any working
# directory, also on a machine that runs the suite as `PYTHONPATH=. python3 -m pytest` without a venv.
_inherited = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *_inherited])
# The suite runs on the CPU unless GLOWTRAIN_TEST_DEVICE says otherwise: with a GPU present, `run.device:
# auto` would otherwise move some tests onto it silently (and torchrun tests onto NCCL). Set before torch
# first asks CUDA anything; subprocesses inherit it.
if not os.environ.get("GLOWTRAIN_TEST_DEVICE", "cpu").startswith("cuda"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
else:
    # torch fixes the cuBLAS workspace at the first matrix product, long before a deterministic training test
    # runs; a real `glowtrain fit` sets this before its first one (precision.configure), and so does the suite.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from helpers import TEST_DEVICE, describe_test_device, device_problem  # noqa: E402


def pytest_configure(config):
    problem = device_problem()
    if problem:  # one line and exit code 2, before a single test runs somewhere it was not meant to
        pytest.exit(problem, returncode=2)


def pytest_report_header(config):
    return f"glowtrain test device: {describe_test_device()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the correctness tests run: GLOWTRAIN_TEST_DEVICE (cpu, cuda, cuda:N), the CPU when unset."""
    return TEST_DEVICE


# What the CLI's entry point, its way out and fit's launcher set for the rest of a process. A test that leaves one
# ignored (SIGHUP) makes every child process later tests start inherit it, and glowtrain keeps an ignored signal
# ignored (nohup): those children would train on through the signal a later test sends.
_PROCESS_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                         if hasattr(signal, name))


@pytest.fixture(autouse=True)
def signal_handlers_as_found():
    handlers = {sig: signal.getsignal(sig) for sig in _PROCESS_SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # The tests run tiny models, where one intra-op thread beats several contending for 2 cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def float64_default():
    """Build and run in float64 for the duration of a test (the brute-force checks need it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory):
    """(root, run directory <root>/runs/tiny, the CLI result) of one tiny `glowtrain fit`; tests only read it
    (a test that writes into it removes what it wrote)."""
    from helpers import TINY_RUN, invoke, sets

    root = tmp_path_factory.mktemp("shared")
    run_dir = root / "runs" / "tiny"
    result = invoke("fit", "--out", str(run_dir), "--no-progress", *sets(*TINY_RUN))
    assert result.exit_code == 0, result.output
    return root, run_dir, result
