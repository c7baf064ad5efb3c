"""Peak training memory and step time of Glow with memory saving off and on, for several n_steps.

    .venv/bin/python scripts/bench_memory.py                        # CPU: width 128, batch 16
    .venv/bin/python scripts/bench_memory.py --device cuda          # GPU: width 512, batch 64

Memory: each setting runs two training steps in a fresh subprocess. On CPU its peak resident set
(ru_maxrss, with glibc's mmap threshold fixed) is compared with a baseline child that builds and
initialises the same model but takes no step; on CUDA the child reports
torch.cuda.max_memory_allocated over the steps minus what the model held before them. "Training memory"
is that difference: activations, gradients and optimizer
state. Time: one more child per K alternates steps with memory saving off and on (so a machine
whose load drifts slows both alike) and reports the median of each after warm-up. Prints one JSON
line per setting, then a markdown table of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

MB = 2**20


def _child(args: argparse.Namespace) -> None:
    from glowtrain.model import Glow

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Glow(tuple(args.shape), n_levels=args.levels, n_steps=args.n_steps, hidden_channels=args.width).to(device)
    x = torch.rand(args.batch, *args.shape, device=device) - 0.5
    model.initialize(x)
    model.set_memory_saving(args.mode == "on")
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    # Gradients and Adamax's two state tensors: the part of training memory no scheme of backward changes.
    result = {"n_steps": args.n_steps, "mode": args.mode, "grads_and_state_mb": 3 * n_params * x.element_size() / MB}

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = -model.log_prob(torch.rand_like(x) - 0.5).mean() / model.n_dims
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if args.mode == "time":
        times = {False: [], True: []}
        for repeat in range(args.warmup + args.repeats):
            for enabled in (False, True):
                model.set_memory_saving(enabled)
                elapsed = step()
                if repeat >= args.warmup:
                    times[enabled].append(elapsed)
        result.update(step_s_off=statistics.median(times[False]), step_s_on=statistics.median(times[True]))
        print(json.dumps(result))
        return
    if args.mode == "baseline":
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps(result))
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first step also allocates the optimizer state
        step()
    if device.type == "cuda":
        result["peak_mb"] = result["train_mb"] = (torch.cuda.max_memory_allocated() - base) / MB
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run_child(args: argparse.Namespace, n_steps: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", "--mode", mode, "--n-steps", str(n_steps)]
    for name in ("device", "width", "batch", "levels", "warmup", "repeats", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    command += ["--shape", *map(str, args.shape)]
    env = dict(os.environ)
    if mode != "time":
        # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and then serves
        # them from heap arenas that never shrink, so peak RSS would depend on the allocation history.
        # Not for timing: an mmap per large tensor costs page faults, more for the path that allocates more.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="hidden channels (default 512 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64 on CUDA, 16 on CPU)")
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=(8, 16, 32), help="the values of n_steps (K)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("off", "on", "baseline", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--n-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.width = args.width or (512 if cuda else 128)
    args.batch = args.batch or (64 if cuda else 16)
    if args.child:
        _child(args)
        return

    rows = []
    for n_steps in args.steps:
        base = 0.0 if cuda else _run_child(args, n_steps, "baseline")["peak_mb"]
        row = {"n_steps": n_steps}
        for mode in ("off", "on"):
            result = _run_child(args, n_steps, mode)
            result["train_mb"] = result["peak_mb"] - base if not cuda else result["train_mb"]
            result.update(device=args.device, width=args.width, batch=args.batch, shape=list(args.shape),
                          levels=args.levels, baseline_mb=base)
            print(json.dumps(result), flush=True)
            row[mode] = result
        timing = _run_child(args, n_steps, "time")
        timing.update(device=args.device, width=args.width, batch=args.batch, shape=list(args.shape),
                      levels=args.levels, threads=args.threads)
        print(json.dumps(timing), flush=True)
        row["off"]["step_s"], row["on"]["step_s"] = timing["step_s_off"], timing["step_s_on"]
        rows.append(row)

    print()
    print(f"{args.device}, {'x'.join(map(str, args.shape))}, L={args.levels}, width {args.width}, batch {args.batch}")
    print()
    print("| K | grads + Adamax MB | train MB off | train MB on | memory on/off | step s off | step s on "
          "| time on/off |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        off, on = row["off"], row["on"]
        print(f"| {row['n_steps']} | {off['grads_and_state_mb']:.0f} | {off['train_mb']:.0f} | {on['train_mb']:.0f} | "
              f"{on['train_mb'] / off['train_mb']:.2f} | {off['step_s']:.3f} | {on['step_s']:.3f} | "
              f"{on['step_s'] / off['step_s']:.2f} |")


if __name__ == "__main__":
    main()
