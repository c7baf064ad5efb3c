"""scripts/bench.py is not a test, but it must keep running and keep its numbers consistent."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_launches_split_a_training_step_by_part_and_the_optimisers_share_does_not_grow_with_depth(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import bench

    from glowtrain.optim import GatedAdamax

    monkeypatch.setattr(GatedAdamax, "gate_on_cpu", False)  # _launches_row sets it; monkeypatch restores it
    rows = {}
    for n_steps in (2, 8):
        monkeypatch.setitem(bench.CONFIGS, "tiny", ((1, 8, 8), 2, n_steps, 8, 4, 4))
        rows[n_steps] = bench._launches_row("tiny", torch.device("cpu"))
    for row in rows.values():
        assert sum(row["by_part"].values()) == row["launch_estimate"]
        assert row["outside_the_model"] == row["launch_estimate"] - row["by_part"]["model forward and backward"]
    shallow, deep = rows[2]["by_part"], rows[8]["by_part"]
    assert deep["model forward and backward"] > 3 * shallow["model forward and backward"]
    # The optimiser works on one flat buffer: with 4x the parameter tensors, only its one foreach op (the add
    # onto the parameters) launches more, as EMA's one foreach lerp does.
    one_foreach_op = math.ceil(rows[8]["parameters"] / 48) - math.ceil(rows[2]["parameters"] / 48)
    assert one_foreach_op > 0
    assert deep["optimiser"] - shallow["optimiser"] == one_foreach_op == deep["EMA"] - shallow["EMA"]
    # Evaluation builds each 1x1 convolution's W once, not per batch.
    from glowtrain.flows import InvConv2d

    monkeypatch.setattr(InvConv2d, "_forward_matrix", InvConv2d._wide_matrix)
    uncached = bench._launches_row("tiny", torch.device("cpu"))["evaluation_batch"]
    assert 0 < rows[8]["evaluation_batch"] < uncached - 8 * 2  # at least one kernel saved per 1x1 convolution
