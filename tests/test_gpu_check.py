"""scripts/gpu_check.py runs on a lent GPU once in a while; run it tiny on the CPU here so it cannot rot."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_every_section_runs_tiny_on_the_cpu_and_reports_sane_figures(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--no-compile", "--jobs", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(r["section"], r["variant"]) for r in rows] == _gpu_check().FOREGROUND  # in order, two at a time
    by_name = {(r["section"], r["variant"]): r for r in rows}
    assert {s for s, _ in by_name} == {"env", "throughput", "tests", "exact64", "mix64", "roundtrip", "fit", "memory",
                                      "ddp", "resume"}
    tests = by_name[("tests", "")]  # the device tests in a pytest of their own, counted
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0 and tests["exit_code"] == 0
    assert by_name[("mix64", "")]["float64_ms_per_step"] > 0
    # Where the host's time goes in a step, part by part (each less the parts inside it) and function by function.
    throughput = by_name[("throughput", "eager-tf32")]
    assert set(throughput["host_ms_by_part"]) == {"prepare batch", "model forward and backward",
                                                  "clipping and finite checks", "optimiser", "EMA"}
    assert 0 < sum(throughput["host_ms_by_part"].values()) <= throughput["host_ms_per_step"] + 0.05  # rounding
    assert throughput["host_functions_own_ms_per_step"] and "host_profile_error" not in throughput
    assert all(r["status"] == "ok" for r in rows)
    assert by_name[("exact64", "")]["max_logdet_error"] < 1e-8
    roundtrip = by_name[("roundtrip", "")]
    assert roundtrip["training_tf32"]["roundtrip_max_error"] < 1e-3
    assert roundtrip["inference"]["roundtrip_max_error"] < 1e-4
    assert by_name[("resume", "deterministic")]["bit_exact"]
    assert by_name[("ddp", "")]["max_weight_difference"] == 0.0
    # Between logging steps neither optimiser's loop reads a value back (both skip bad steps on the device): on a
    # CPU every tensor counts, and the one read left is the batch sampler's host-side index list.
    for optimizer in ("adam", "adamax"):
        reads = by_name[("fit", optimizer)]["host_reads"]
        quiet = {place: n for place, n in reads["places"].items() if place.startswith("quiet step")}
        assert reads["per_quiet_step"] <= 1 and all("loaders.py" in place for place in quiet), (optimizer, quiet)
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and all(line.startswith("|") for line in table)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_and_skip_pick_sections_or_single_variants():
    gpu_check = _gpu_check()
    rows = gpu_check.FOREGROUND + gpu_check.BACKGROUND

    def plan(only, skip=()):
        return [row for row in rows if gpu_check.chosen(row, only, list(skip))]

    assert plan(None) == rows
    assert plan(["throughput:cudagraphs-tf32", "exact64"]) == [("exact64", ""), ("throughput", "cudagraphs-tf32")]
    assert {v for _, v in plan(["throughput"], ["throughput:eager-fp32"])} == \
        {"eager-tf32", "eager-bf16", "compiled-tf32", "compiled-bf16", "cudagraphs-tf32", "steps-cudagraphs-tf32",
         "steps-cudagraphs-bf16", "steps-cudagraphs-memsave-tf32"}
    assert plan(["fit"], ["fit"]) == []
    # The quickest compiles come first: with one compiler at a time, later ones may miss the deadline.
    assert [variant for _, variant in gpu_check.BACKGROUND[:4]] == [
        "steps-cudagraphs-tf32", "steps-cudagraphs-bf16", "steps-cudagraphs-memsave-tf32", "cudagraphs-tf32"]


def test_a_selection_that_leaves_nothing_to_run_is_refused_before_any_section_starts(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--only", "throughput:cudagraphs-tf32",
                           "--no-compile", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "leave nothing to run" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_the_summary_of_host_reads_names_every_quiet_step_place_however_rare():
    # The H200's one Adamax sync per run was cut from the report: it shared the thirteenth place with others.
    gpu_check = _gpu_check()
    events = [(-1, f"x.py:{line}") for line in range(20) for _ in range(line + 2)]
    events += [(0, "optim.py:110 __init__"), (5, "train.py:1 read"), (5, "train.py:1 read")]
    summary = gpu_check.HostReads.summary(None, events, quiet_steps={0, 1, 2, 3})
    assert summary["places"]["quiet step: optim.py:110 __init__"] == 1
    assert "setup: x.py:19" in summary["places"] and "logging/eval step: train.py:1 read" not in summary["places"]
    assert len(summary["places"]) == 12 and summary["quiet_steps_with_syncs"] == [0]  # the commonest 11 beside it
    assert summary["per_quiet_step"] == 1 / 4 and summary["total"] == len(events)


def test_the_tests_section_reads_pytests_counts_and_failures_from_a_real_gpu_run():
    """The H200's run of the device tests at ee96e50 (results/): 36 passed, 2 failed, each named."""
    output = (SCRIPT.parents[1] / "results" / "pytest_cuda_h200_ee96e50.txt").read_text()
    outcome = _gpu_check().pytest_outcome(output)
    assert outcome == {"passed": 36, "failed": 2, "errors": 0, "skipped": 0, "failures": [
        "tests/test_on_device.py::test_cuda_graphs_train_as_eager_does_on_the_test_device[whole model, accumulating]",
        "tests/test_checkpoint.py::test_save_checkpoint_writes_a_loadable_file_and_leaves_no_temporary_files"]}
    assert _gpu_check().pytest_outcome("") == {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    reasons = "FAILED tests/a.py::test_b[x, y] - AssertionError: no\n1 failed, 2 passed, 1 skipped in 3.00s\n"
    assert _gpu_check().pytest_outcome(reasons) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 1,
                                                    "failures": ["tests/a.py::test_b[x, y]"]}
