"""{affine, spline} couplings x {uniform, variational} dequantisation on the bundled digits, at equal wall-clock.

    PYTHONPATH=. nice python3 scripts/compare_couplings.py --seeds 0 1 2 --out results/couplings_digits.jsonl

First times `Trainer.train_step` of each combination on the real digits, interleaved round by round so
that all of them see the same load on a shared machine (median ms per step, and its ratio to the
default of the time, affine + uniform; the digits default is now spline + variational). Then trains
each combination and seed with `glowtrain fit` (one run at a time) for the number of steps the
default's 1,000-step budget affords it, 1000 / ratio, and records the final test bpd (EMA weights),
the parameter counts and the wall time. Prints a markdown table of mean +- spread (half the range)
over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

COMBOS = [("affine", "uniform"), ("affine", "variational"), ("spline", "uniform"), ("spline", "variational")]
DEFAULT_STEPS = 1000


def _overrides(coupling: str, dequantization: str) -> list[str]:
    return [f"model.coupling={coupling}", f"model.dequantization={dequantization}", "run.device=cpu"]


def step_times(rounds: int, warmup: int) -> dict[tuple[str, str], float]:
    """Median ms per training step of each combination, timed in interleaved rounds."""
    from glowtrain.config import apply_overrides, load_config
    from glowtrain.distributed import Context
    from glowtrain.runs import RunDir
    from glowtrain.train import Trainer

    trainers = {}
    for combo in COMBOS:
        cfg = apply_overrides(load_config(), _overrides(*combo))
        trainer = Trainer(cfg, Context(device=torch.device("cpu")), RunDir(tempfile.mkdtemp()), progress=False)
        trainers[combo] = (trainer, *next(trainer.batches))
    times: dict[tuple[str, str], list[float]] = {combo: [] for combo in COMBOS}
    for index in range(warmup + rounds):
        for combo, (trainer, images, labels) in trainers.items():
            start = time.perf_counter()
            trainer.train_step(images, labels)
            if index >= warmup:
                times[combo].append(1000 * (time.perf_counter() - start))
    return {combo: statistics.median(values) for combo, values in times.items()}


def parameter_counts(coupling: str, dequantization: str) -> tuple[int, int]:
    from glowtrain.config import apply_overrides, load_config
    from glowtrain.model import Glow
    from glowtrain.objective import build_objective

    cfg = apply_overrides(load_config(), _overrides(coupling, dequantization))
    objective = build_objective(Glow.from_config(cfg), cfg)
    flow = sum(p.numel() for p in objective.model.parameters())
    return flow, sum(p.numel() for p in objective.dequantizer.parameters())


def fit(coupling: str, dequantization: str, seed: int, steps: int, work: Path) -> dict:
    out = work / f"{coupling}-{dequantization}-seed{seed}"
    sets = [*_overrides(coupling, dequantization), f"run.seed={seed}", f"train.steps={steps}"]
    command = [sys.executable, "-m", "glowtrain", "fit", "--out", str(out), "--no-progress"]
    command += [arg for item in sets for arg in ("--set", item)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    tests = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"test"' in line]
    return {"coupling": coupling, "dequantization": dequantization, "seed": seed, "steps": steps,
            "test_bpd": tests[-1]["bpd"], "wall_s": wall, "command": "glowtrain fit " + " ".join(
                f"--set {item}" for item in sets)}


def table(records: list[dict], ratios: dict, times: dict) -> str:
    rows = ["| coupling | dequantization | parameters (flow + noise flow) | ms/step (median) | ratio to default "
            "| steps in the budget | test bpd, mean ± half-range | seeds |", "|---|---|---|---|---|---|---|---|"]
    for combo in COMBOS:
        mine = [r for r in records if (r["coupling"], r["dequantization"]) == combo]
        if not mine:
            continue
        bpds = [r["test_bpd"] for r in mine]
        flow, noise = parameter_counts(*combo)
        spread = (max(bpds) - min(bpds)) / 2
        rows.append(f"| {combo[0]} | {combo[1]} | {flow:,} + {noise:,} | {times[combo]:.1f} | {ratios[combo]:.2f} "
                    f"| {mine[0]['steps']} | {statistics.mean(bpds):.3f} ± {spread:.3f} | "
                    f"{', '.join(f'{b:.3f}' for b in bpds)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per combination")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="results/couplings_digits.jsonl")
    parser.add_argument("--combos", nargs="+", default=[f"{c}+{d}" for c, d in COMBOS])
    args = parser.parse_args()
    times = step_times(args.rounds, args.warmup)
    ratios = {combo: times[combo] / times[COMBOS[0]] for combo in COMBOS}
    print(json.dumps({"ms_per_step": {"+".join(k): v for k, v in times.items()}}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="compare_couplings_"))
    records = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as log:
        log.write(json.dumps({"ms_per_step": {"+".join(k): v for k, v in times.items()}}) + "\n")
        for seed in args.seeds:
            for combo in COMBOS:
                if "+".join(combo) not in args.combos:
                    continue
                record = fit(*combo, seed, round(DEFAULT_STEPS / ratios[combo]), work)
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
    print(table(records, ratios, times))


if __name__ == "__main__":
    main()
