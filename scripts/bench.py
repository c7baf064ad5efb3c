"""Training and sampling speed of glowtrain, and how close it runs to the machine's matmul speed.

    .venv/bin/python scripts/bench.py                       # CPU: the digits shape and the CIFAR shape
    .venv/bin/python scripts/bench.py --amp off bf16        # also with bf16 coupling networks
    .venv/bin/python scripts/bench.py --memory [ARGS]       # memory saving off/on: scripts/bench_memory.py
    .venv/bin/python scripts/bench.py --optimizer --configs cifar_paper   # GatedAdamax alone: launches, ms
    .venv/bin/python scripts/bench.py --launches --configs cifar_paper    # a training step's launches, by part
    PYTHONPATH=. python3 scripts/bench.py --device cuda --configs cifar_shape cifar_paper --compile off on steps

Each setting runs in a fresh subprocess (so peak memory is its own) and times the real
`Trainer.train_step` (dequantise, forward, bits/dim, backward, clipping, Adamax, EMA) on random
images held in memory: it reports training images/s and ms per step (median over the timed steps
after warm-up), the first step's seconds (compiling, with --compile on or steps), peak memory (CUDA
max allocated, or the process's peak RSS on CPU), sampling images/s at T = 0.7, multiply-adds per image, and the
achieved FLOP/s of a training step (3 x 2 x multiply-adds per image, forward plus a backward of
about twice the forward) as a fraction of a dense matmul's FLOP/s timed right after each step (the
median of the per-step ratios). It also profiles two steps for the share of operator time spent in
convolutions and matrix products; fraction / share is those kernels' own fraction of matmul, so
what stands between them and the target is told apart from the overhead between them.
Prints one JSON line per setting, then a markdown table. Timings are noisy: compare ratios.

--optimizer times only the optimiser's gated step (the form accelerators run, here on the given device)
over each config's parameters with random gradients, and counts the ops it dispatches as a stand-in for
GPU kernel launches (see `LaunchCount`); one JSON line per config.

--launches counts one whole `Trainer.train_step` that way (the optimiser in the accelerators' form), by
part: the model's forward and backward (what a compiled graph holds), and what runs around it (batch
preparation, clipping with the finite checks, the optimiser, EMA), and one evaluation batch (the
model's log-density in eval mode); one JSON line per config.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CONFIGS = {
    # name: (image shape, n_levels, n_steps, hidden_channels, batch, n_bits[, other model keys])
    "digits": ((1, 8, 8), 2, 8, 64, 64, 4),  # the bundled digits' shape, with Glow's layers
    # The digits default itself: spline couplings and the learned (variational) dequantiser.
    "digits_default": ((1, 8, 8), 2, 8, 64, 64, 4, ("model.coupling=spline", "model.dequantization=variational")),
    "cifar_shape": ((3, 32, 32), 3, 8, 256, 16, 8),
    "cifar_paper": ((3, 32, 32), 3, 32, 512, 64, 8),
    # The paper's depth with almost no arithmetic: a step's time is the host's (Python, dispatch, guards).
    "paper_depth_tiny": ((3, 32, 32), 3, 32, 8, 2, 8),
}


class _MatmulReference:
    """A dense matmul's FLOP/s, timed right after each training step so that both see the same machine.

    Shared machines drift by tens of percent within a minute; interleaving keeps the ratio honest.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, sync):
        # On CPUs without bf16 arithmetic a 2048^3 bf16 product takes about a minute: a smaller one there.
        self.size = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 512
        self.a = torch.randn(self.size, self.size, device=device, dtype=dtype)
        self.b = torch.randn(self.size, self.size, device=device, dtype=dtype)
        self.sync = sync
        for _ in range(2):
            self.flops()

    def flops(self) -> float:
        self.sync()
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        self.sync()
        return 2 * self.size**3 / (time.perf_counter() - start)


# The operators the multiply-add count covers: convolutions and matrix products, forward and backward.
# Exact names: kernel names vary by library version, and compiled graphs name fused pointwise
# kernels after the convolutions they follow.
_DENSE_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward",
    "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_convolution", "aten::convolution",
    "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward",
}


def _dense_kernel_share(run_step, device: torch.device) -> float:
    """Fraction of a training step's operator time spent in convolutions and matrix products.

    On CUDA, device time of the kernels each operator launched itself; on CPU, each operator's own time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(2):
            run_step()
    dense = total = 0.0
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):  # kernels and autograd nodes: counted through their operators
            continue
        own = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if cuda \
            else event.self_cpu_time_total
        total += own
        if event.key in _DENSE_OPS:
            dense += own
    return dense / total if total else float("nan")


def synthetic_trainer(image_shape, overrides: list[str], device: torch.device, batch: int, work_dir: str):
    """A real Trainer (data-dependent init, optimiser, EMA, clipping) over random uint8 images in memory.

    Returns (trainer, images, labels): one batch to time `trainer.train_step(images, labels)` on."""
    from glowtrain.config import apply_overrides, load_config
    from glowtrain.data import TensorImages
    from glowtrain.distributed import Context
    from glowtrain.runs import RunDir
    from glowtrain.train import Trainer

    channels, size, _ = image_shape
    dataset = "digits" if size == 8 and channels == 1 else "cifar10" if channels == 3 else "mnist"
    cfg = apply_overrides(load_config(), [f"data.dataset={dataset}", f"data.image_size={size}",
                                          f"data.channels={channels}", f"train.batch_size={batch}",
                                          f"train.init_batch_size={batch}", "train.warmup_steps=0", "train.compile=off",
                                          # Glow's layers, as measured in README (the digits default is now splines)
                                          "model.coupling=affine", "model.dequantization=uniform", *overrides])
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, *image_shape), dtype=torch.uint8, generator=generator)
    data = TensorImages(images, torch.zeros(len(images), dtype=torch.int64))
    trainer = Trainer(cfg, Context(device=device), RunDir(work_dir), datasets=(data, data), progress=False)
    batch_images, batch_labels = next(trainer.batches)
    return trainer, batch_images, batch_labels


def model_overrides(config: str) -> list[str]:
    """The config overrides that build `config`'s model (CONFIGS) over its number of bits."""
    _, levels, n_steps, width, _, n_bits, *others = CONFIGS[config]
    return [f"model.n_levels={levels}", f"model.n_steps={n_steps}", f"model.hidden_channels={width}",
            f"data.n_bits={n_bits}", *(others[0] if others else ())]


class LaunchCount(TorchDispatchMode):
    """Ops dispatched while active, as a device-free estimate of the GPU kernels they would launch.

    A view launches nothing; a foreach op over n tensors counts ceil(n / 48), a rough figure for how often
    CUDA's multi_tensor_apply splits its lists (every 48 to 110 tensors, by op and dtype); any other op one.
    """

    TENSORS_PER_FOREACH_LAUNCH = 48

    def __init__(self):
        super().__init__()
        self.foreach_ops = self.other_ops = self.launches = 0
        self.names: dict[str, int] = {}
        self.part = ""  # what the caller is running: launches are also summed per part
        self.by_part: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith("_record_function"):  # profiler marks, not work
            if name.startswith("_foreach_"):
                self.foreach_ops += 1
                n_tensors = len(next(a for a in args if isinstance(a, (list, tuple))))  # pow's base may lead
                launches = math.ceil(n_tensors / self.TENSORS_PER_FOREACH_LAUNCH)
            else:
                self.other_ops += 1
                launches = 1
            self.launches += launches
            self.names[name] = self.names.get(name, 0) + 1
            self.by_part[self.part] = self.by_part.get(self.part, 0) + launches
        return func(*args, **(kwargs or {}))

    def parts(self, obj, methods: dict[str, str]):
        """Wrap obj's methods (name -> part) so that the launches they make are summed under their part."""
        for method, part in methods.items():
            real = getattr(obj, method)

            def counted(*args, _real=real, _part=part, **kwargs):
                outer, self.part = self.part, _part
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.part = outer

            setattr(obj, method, counted)


def _optimizer_row(config: str, device: torch.device, steps: int) -> dict:
    """Launch estimate and median time of one gated GatedAdamax step over `config`'s parameters."""
    import tempfile

    from glowtrain.optim import GatedAdamax

    overrides = [*model_overrides(config), "train.optimizer=adamax"]
    optimizer = synthetic_trainer(CONFIGS[config][0], overrides, device, 2, tempfile.mkdtemp())[0].optimizer
    GatedAdamax.gate_on_cpu = True  # the accelerators' form, on whatever device this is
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)
    optimizer.found_inf = torch.zeros((), device=device)
    optimizer.step()  # creates the state
    with LaunchCount() as count:
        optimizer.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"config": config, "device": str(device), "parameters": len(params),
            "elements": sum(p.numel() for p in params), "foreach_ops": count.foreach_ops,
            "other_ops": count.other_ops, "launch_estimate": count.launches, "ops": count.names,
            "ms_per_step": 1000 * statistics.median(times)}


def step_parts(trainer) -> list[tuple[object, dict[str, str]]]:
    """Where a training step's work is: (object, {method: part}) pairs to wrap. The optimiser's step runs inside
    the clipping part, which then counts only the rest."""
    import glowtrain.train as training

    return [(trainer, {"prepare_batch": "prepare batch", "_forward_backward": "model forward and backward",
                       "_optimizer_step": "clipping and finite checks"}),
            (trainer.optimizer, {"step": "optimiser"}), (training, {"update_ema": "EMA"})]


def _launches_row(config: str, device: torch.device) -> dict:
    """Launch estimate of one whole training step over `config`, by part (see `LaunchCount`)."""
    import tempfile

    from glowtrain.optim import GatedAdamax

    shape, batch = CONFIGS[config][0], CONFIGS[config][4]
    overrides = [*model_overrides(config), "train.optimizer=adamax", "train.ema_decay=0.999"]
    GatedAdamax.gate_on_cpu = True  # the accelerators' form, on whatever device this is
    trainer, images, labels = synthetic_trainer(shape, overrides, device, batch, tempfile.mkdtemp())
    trainer.train_step(images, labels)  # creates the optimiser's state
    count = LaunchCount()
    for obj, methods in step_parts(trainer):
        count.parts(obj, methods)
    with count:
        trainer.train_step(images, labels)
    parts = {part or "other": n for part, n in count.by_part.items()}
    model = trainer.eval_objective.model.eval()
    inputs = images.to(device).float() / 255 - 0.5
    with torch.inference_mode():
        model.log_prob(inputs)  # evaluation caches what does not change between batches
        with LaunchCount() as evaluation:
            model.log_prob(inputs)
    return {"config": config, "device": str(device), "parameters": len(list(trainer.objective.parameters())),
            "launch_estimate": count.launches, "by_part": parts,
            "outside_the_model": count.launches - parts.get("model forward and backward", 0),
            "evaluation_batch": evaluation.launches}


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocation, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    import tempfile

    from glowtrain.analysis import multiply_adds
    from glowtrain.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # with glowtrain's own math settings (TF32 on CUDA)
    shape, batch = CONFIGS[args.config][0], CONFIGS[args.config][4]
    overrides = [*model_overrides(args.config), f"train.amp='{args.amp}'", f"train.compile={args.compile != 'off'}",
                 f"train.compile_scope={'steps' if args.compile == 'steps' else 'model'}"]
    trainer, images, labels = synthetic_trainer(shape, overrides, device, batch, tempfile.mkdtemp())
    model = trainer.model
    macs = multiply_adds(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_step() -> None:
        trainer.train_step(images, labels)

    start = time.perf_counter()
    run_step()  # compiles, when compiling
    sync()
    first_step = time.perf_counter() - start
    for _ in range(max(1, args.warmup) - 1):
        run_step()
    sync()
    peak_mb = _peak_memory_mb(device)  # the training step's own: the matmul reference below allocates more
    reference = _MatmulReference(device, torch.bfloat16 if args.amp == "bf16" else torch.float32, sync)
    flops_per_step = 3 * 2 * macs * batch  # forward, plus a backward of about twice the forward
    step_times, fractions, references = [], [], []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        run_step()
        sync()
        step_times.append(time.perf_counter() - start)
        references.append(reference.flops())
        fractions.append(flops_per_step / step_times[-1] / references[-1])
    step = statistics.median(step_times)
    dense_share = _dense_kernel_share(run_step, device)

    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    sample_times = []
    with torch.no_grad():
        for i in range(args.warmup + max(2, args.steps // 2)):
            sync()
            start = time.perf_counter()
            model.sample(batch, 0.7, generator=generator)
            sync()
            if i >= args.warmup:
                sample_times.append(time.perf_counter() - start)
    sample = statistics.median(sample_times)

    achieved = flops_per_step / step
    print(json.dumps({
        "config": args.config, "device": str(device), "amp": args.amp, "compile": args.compile, "batch": batch,
        "train_images_per_s": batch / step, "ms_per_step": 1000 * step, "first_step_s": first_step,
        "peak_memory_mb": peak_mb,
        "sample_images_per_s": batch / sample, "sample_vs_train_step_per_image": step / sample,
        "multiply_adds_per_image": macs, "achieved_gflops": achieved / 1e9,
        "matmul_gflops": statistics.median(references) / 1e9, "fraction_of_matmul": statistics.median(fractions),
        "dense_kernel_share": dense_share,
        "dense_kernel_fraction_of_matmul": statistics.median(fractions) / dense_share if dense_share else math.nan,
    }))


def main() -> None:
    if "--memory" in sys.argv[1:]:
        script = str(Path(__file__).with_name("bench_memory.py"))
        raise SystemExit(subprocess.call([sys.executable, script, *[a for a in sys.argv[1:] if a != "--memory"]]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["digits", "cifar_shape"], choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on", "steps"],
                        help="on: the whole model (train.compile_scope=model); steps: each flow step")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", action="store_true", help="time and count the optimiser's step alone")
    parser.add_argument("--launches", action="store_true", help="count a training step's launches, by part")
    args = parser.parse_args()
    if args.launches:
        for config in args.configs:
            print(json.dumps(_launches_row(config, torch.device(args.device))), flush=True)
        return
    if args.optimizer:
        if args.threads:
            torch.set_num_threads(args.threads)
        for config in args.configs:
            print(json.dumps(_optimizer_row(config, torch.device(args.device), args.steps)), flush=True)
        return
    if args.child:
        args.amp, args.compile = args.amp[0], args.compile[0]
        _child(args)
        return
    rows = []
    for config in args.configs:
        for amp in args.amp:
            for compile_ in args.compile:
                command = [sys.executable, __file__, "--child", "--config", config, "--device", args.device,
                           "--amp", amp, "--compile", compile_, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{config} amp={amp} compile={compile_} failed:\n{done.stderr}", file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    print()
    print("| config | device | amp | compile | batch | train img/s | ms/step | first step s | peak MB | sample img/s "
          "| sample speed-up per image | GFLOP/s | matmul GFLOP/s | fraction | conv+matmul time share "
          "| conv+matmul fraction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['device']} | {r['amp']} | {r['compile']} | {r['batch']} "
              f"| {r['train_images_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['first_step_s']:.1f} "
              f"| {r['peak_memory_mb']:.0f} "
              f"| {r['sample_images_per_s']:.0f} | {r['sample_vs_train_step_per_image']:.1f}x "
              f"| {r['achieved_gflops']:.1f} | {r['matmul_gflops']:.0f} | {r['fraction_of_matmul']:.2f} "
              f"| {r['dense_kernel_share']:.2f} | {r['dense_kernel_fraction_of_matmul']:.2f} |")


if __name__ == "__main__":
    main()
