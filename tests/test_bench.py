"""scripts/bench.py is not a test, but it must keep running and keep its numbers consistent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_reports_consistent_figures_for_the_digits_config():
    done = subprocess.run([sys.executable, str(BENCH), "--configs", "digits", "--steps", "2", "--warmup", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    row = json.loads(lines[0])
    assert row["config"] == "digits" and row["batch"] == 64
    assert row["ms_per_step"] > 0 and row["train_images_per_s"] == pytest.approx(64 / (row["ms_per_step"] / 1000))
    flops_per_step = 6 * row["multiply_adds_per_image"] * 64
    assert row["achieved_gflops"] * 1e9 == pytest.approx(flops_per_step / (row["ms_per_step"] / 1000))
    assert 0 < row["fraction_of_matmul"] < 2 and 0 < row["dense_kernel_share"] <= 1
    fraction = row["fraction_of_matmul"] / row["dense_kernel_share"]
    assert row["dense_kernel_fraction_of_matmul"] == pytest.approx(fraction)
    assert any(line.startswith("| digits | cpu | off | off | 64 |") for line in lines)
