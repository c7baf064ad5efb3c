"""Everything a session lent a GPU for a few minutes should measure, in one call that always returns.

    PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT             # on the GPU machine (deadline 470 s)
    PYTHONPATH=. python3 scripts/gpu_check.py --only roundtrip fit   # rerun some sections
    PYTHONPATH=. python3 scripts/gpu_check.py --only throughput:cudagraphs-tf32   # one variant of a section
    .venv/bin/python scripts/gpu_check.py --device cpu --quick --jobs 2   # every section, tiny, on a CPU, two at a time

Sections (each runs in its own process and prints one JSON line when it finishes):
  env         driver, torch, CUDA, cuDNN, capability, bf16 support, the TF32 flags glowtrain sets
  throughput  the paper's CIFAR-10 model (3x32x32, L=3, K=32, width 512, affine, batch 64): a real
              training step (forward, bits/dim, backward, clipping, Adamax, EMA), eager and compiled
              (the whole model, or each flow step: `steps-`; `-memsave`: memory saving on), TF32 and
              bf16: images/s, kernels and launches per step, GPU busy share, host syncs, the slowest
              kernels, the host's time per part of the step and the Python functions that take most of
              it, peak memory, sampling speed
  exact64     float64 log-determinants on the device against brute-force Jacobians
  mix64       what the float64 1x1 convolutions cost per training step at the paper size, against float32
  roundtrip   float32 decode(encode(x)) and memory-saving drift at the paper size, per precision policy
  fit         the real `fit` loop for 60 steps on a synthetic uint8 CIFAR-shaped cache: images/s,
              host reads and CUDA syncs per step and where they come from, evaluation speed
  memory      the CelebA-HQ 256 model (L=6, K=32, width 512): memory per image with and without memory
              saving, and the largest batch each allows on this device
  ddp         DistributedDataParallel over NCCL (gloo on CPU) at world size 1 against plain training
  resume      an interrupted-and-resumed run against an uninterrupted one, default and deterministic mode
  tests       the suite's device tests on the device (GLOWTRAIN_TEST_DEVICE): passed, failed and which; a test
              still running after 120 s prints every thread's stack (a hang shows where it waits), and the
              deadline ends the run with SIGKILL, never the SIGTERM a run under test would save on

All sections share one deadline (--deadline seconds from the start): a section still running then is
stopped and reported as such, so partial results always come back. Compiled throughput compiles in the
background (niced) while the other sections run, one variant after another (three compiling side by side
on the H200's 16 cores all missed a 415 s deadline; the whole model alone took 149 s), the flow-step
variants first (they compile in a fraction of that), and times itself only while no other section holds
the GPU. The sections after the eager throughput therefore share the CPU with a compiler: their speeds
are lower bounds. Writes gpu_check.json and gpu_check.md to --out.

Everything takes about 15 minutes on an H200, more than one device call allows; two calls fit:
    gpu_check.py --out $OUT --no-compile --deadline 540                       # about 470 s
    gpu_check.py --out $OUT --only throughput:steps-cudagraphs-tf32 throughput:steps-cudagraphs-bf16 \
        throughput:steps-cudagraphs-memsave-tf32 throughput:cudagraphs-tf32 --deadline 400
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import fcntl
import json
import math
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from glowtrain.precision import tf32 as precision  # noqa: E402

RESULT = "GPU_CHECK_RESULT "
PARTIAL = "GPU_CHECK_PARTIAL "

# name: (image shape, n_levels, n_steps, hidden_channels, coupling, batch, n_bits)
FULL = {
    "cifar": ((3, 32, 32), 3, 32, 512, "affine", 64, 8),
    "celebahq": ((3, 256, 256), 6, 32, 512, "additive", 0, 5),
    "small": ((3, 32, 32), 3, 4, 128, "affine", 32, 8),
}
QUICK = {
    "cifar": ((3, 16, 16), 2, 2, 32, "affine", 8, 8),
    "celebahq": ((3, 32, 32), 3, 2, 16, "additive", 0, 5),
    "small": ((3, 16, 16), 2, 2, 16, "affine", 8, 8),
}

# (section, variant); compiled throughput runs in the background while the others run in this order.
FOREGROUND = [
    ("env", ""),
    ("throughput", "eager-tf32"), ("throughput", "eager-bf16"), ("throughput", "eager-fp32"),
    ("tests", ""),
    ("exact64", ""), ("mix64", ""), ("roundtrip", ""),
    ("fit", "adamax"), ("fit", "adam"),
    ("memory", ""), ("ddp", ""),
    ("resume", "default"), ("resume", "deterministic"),
]
# Quickest to compile first (train.compile_scope: steps compiles one flow step per level), then the whole
# model with CUDA graphs: with the deadline, later ones may not get their turn.
BACKGROUND = [("throughput", "steps-cudagraphs-tf32"), ("throughput", "steps-cudagraphs-bf16"),
              ("throughput", "steps-cudagraphs-memsave-tf32"), ("throughput", "cudagraphs-tf32"),
              ("throughput", "compiled-tf32"), ("throughput", "compiled-bf16")]
SECTIONS = sorted({s for s, _ in FOREGROUND + BACKGROUND})
VARIANTS = sorted(f"{s}:{v}" for s, v in FOREGROUND + BACKGROUND if v)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the sections (they run in the child processes)
# --------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def gpu_lock(path: str | None):
    """Hold the GPU for timing: only one section at a time measures speed."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def emit_partial(result: dict) -> None:
    print(PARTIAL + json.dumps(result), flush=True)


def apply_glowtrain_device_settings(device: torch.device) -> None:
    """What glowtrain itself does when a command resolves its device (TF32, cuDNN autotuning)."""
    from glowtrain.distributed import resolve_device

    resolve_device(str(device))


def build_glow(spec, device: torch.device, seed: int = 0):
    from glowtrain.model import Glow

    shape, levels, steps, width, coupling, _, _ = spec
    torch.manual_seed(seed)
    return Glow(shape, n_levels=levels, n_steps=steps, hidden_channels=width, coupling=coupling).to(device)


def perturb_(model: torch.nn.Module, scale: float, seed: int = 1) -> None:
    """Move every parameter off its (often identity) init, so inverses and log-dets are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(p))


_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"}
STEP_MARK = "gpu_check.step"
_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def profile_steps(step, device: torch.device, n_steps: int) -> dict:
    """Kernels, launches and syncs per step, and the kernels that take the most device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    if device.type != "cuda":
        return {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            with record_function(STEP_MARK):
                step()
        sync(device)
    # Syncs count only inside the steps: the harness's own and the profiler's (at least 2 per run, seen
    # on an H200 as 5 over 3 steps whose loop made 3) are not the step's.
    steps = [e.time_range for e in prof.events() if e.name == STEP_MARK and e.device_type == DeviceType.CPU]
    kernels, launches, syncs, intervals, by_name = 0, 0, 0, [], {}
    for event in prof.events():
        # The GPU timeline also carries user annotations (e.g. "Optimizer.step#Adamax.step") spanning many
        # kernels and the gaps between them: they are not kernels.
        annotation = getattr(event, "is_user_annotation", False) or "#" in event.name or \
            event.name.startswith(("Optimizer.", "ProfilerStep", STEP_MARK))
        if event.device_type == DeviceType.CUDA and not annotation:
            kernels += 1
            start, end = event.time_range.start, event.time_range.end
            intervals.append((start, end))
            by_name[event.name] = by_name.get(event.name, 0.0) + (end - start)
        elif event.name in _LAUNCHES:
            launches += 1
        elif event.name in _SYNCS and any(r.start <= event.time_range.start <= r.end for r in steps):
            syncs += 1
    busy_us, last_end = 0.0, -math.inf
    for start, end in sorted(intervals):  # the union of kernel intervals: concurrent kernels count once
        if end > last_end:
            busy_us += end - max(start, last_end)
            last_end = end
    slowest = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "kernels_per_step": kernels / n_steps, "launches_per_step": launches / n_steps,
        "host_syncs_per_step": syncs / n_steps, "device_busy_ms_per_step": busy_us / 1000 / n_steps,
        "slowest_kernels_ms_per_step": {name[:90]: round(us / 1000 / n_steps, 3) for name, us in slowest},
    }


class HostTimeByPart:
    """The host's own time in each part of a training step (less the parts it calls), device work queued and
    not waited for: where a host-bound step's time goes. Parts as `bench.step_parts` names them."""

    def __init__(self, trainer):
        from bench import step_parts

        self.ms: dict[str, float] = {}
        self._open: list[list] = []  # [part, start, seconds in the parts it called]
        self._wrapped = []  # (object, method name, its own attribute of that name: None for a class's method)
        for obj, methods in step_parts(trainer):
            for method, part in methods.items():
                self._wrapped.append((obj, method, vars(obj).get(method)))
                setattr(obj, method, self._timed(getattr(obj, method), part))

    def _timed(self, real, part):
        def timed(*args, **kwargs):
            self._open.append([part, time.perf_counter(), 0.0])
            try:
                return real(*args, **kwargs)
            finally:
                _, start, inner = self._open.pop()
                elapsed = time.perf_counter() - start
                self.ms[part] = self.ms.get(part, 0.0) + 1000 * (elapsed - inner)
                if self._open:
                    self._open[-1][2] += elapsed
        return timed

    def restore(self) -> None:
        for obj, method, own in self._wrapped:
            if own is None:
                delattr(obj, method)  # the class's method shows through again
            else:
                setattr(obj, method, own)  # a module's function


def host_profile(trainer, step, device: torch.device, n_steps: int, n_functions: int = 15) -> dict:
    """The host's time per step, by part of the step, and the Python functions with the most time of their own
    (cProfile, in a second pass: its overhead inflates what it times, not the ranking much)."""
    sync(device)
    timer = HostTimeByPart(trainer)
    try:
        start = time.perf_counter()
        for _ in range(n_steps):
            step()
        host_ms = 1000 * (time.perf_counter() - start)  # not waiting for the device: the host's share
    finally:
        timer.restore()
    sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n_steps):
        step()
    profiler.disable()
    sync(device)
    own_time = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:n_functions]
    return {
        "host_ms_per_step": host_ms / n_steps,
        "host_ms_by_part": {part: round(ms / n_steps, 2) for part, ms in
                            sorted(timer.ms.items(), key=lambda item: -item[1])},
        "host_functions_own_ms_per_step": {_function_name(*where): round(1000 * stats[2] / n_steps, 2)
                                           for where, stats in own_time},
    }


def _function_name(path: str, line: int, name: str) -> str:
    """A profiled function as `package/module.py:line(name)`, or a builtin's own name."""
    if path == "~":  # a builtin: its name says what it is
        return name
    for root in ("site-packages/", "dist-packages/", f"{ROOT}/"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{line}({name})"


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": sorted(counters["graph_break"])[:5]}


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------

def section_env(args, device, sizes) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu_count": os.cpu_count(), "c_compiler": shutil.which("cc") or shutil.which("gcc")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported(), device_count=torch.cuda.device_count())
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=driver_version,power.limit,clocks.max.sm"
            done = subprocess.run([smi, query, "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = done.stdout.strip()
    apply_glowtrain_device_settings(device)
    info["after_glowtrain_settings"] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    return info


def section_throughput(args, device, sizes) -> dict:
    from bench import synthetic_trainer  # scripts/ is on sys.path when this script runs

    from glowtrain.analysis import multiply_adds
    from glowtrain.compilation import LazyCompile

    # [steps-]{eager,compiled,cudagraphs}[-memsave]-{tf32,bf16,fp32}
    *modes, dtype = args.variant.split("-")
    compiled = "eager" not in modes
    spec = sizes["cifar"]
    shape, levels, k, width, coupling, batch, n_bits = spec
    apply_glowtrain_device_settings(device)
    tf32 = dtype != "fp32"
    overrides = [f"model.n_levels={levels}", f"model.n_steps={k}", f"model.hidden_channels={width}",
                 f"model.coupling={coupling}", f"data.n_bits={n_bits}", "train.optimizer=adamax",
                 f"train.amp='{'bf16' if dtype == 'bf16' else 'off'}'", "train.ema_decay=0.999",
                 f"train.memory_saving={'memsave' in modes}"]
    with precision(tf32):
        trainer, images, labels = synthetic_trainer(shape, overrides, device, batch, tempfile.mkdtemp())
        model = trainer.model
        macs = multiply_adds(model)
        result = {"variant": args.variant, "batch": batch, "image_shape": list(shape),
                  "parameters": sum(p.numel() for p in model.parameters()), "multiply_adds_per_image": macs}
        if compiled:
            import torch._dynamo as dynamo

            dynamo.reset()
            compile_mode = "reduce-overhead" if "cudagraphs" in modes else "default"
            regions = trainer.objective.compile_regions() if "steps" in modes else ()  # compile_scope: steps
            trainer.forward = LazyCompile(trainer.wrapped, True, compile_mode, regions)

        def step() -> None:
            trainer.train_step(images, labels)

        start = time.perf_counter()
        step()
        sync(device)
        result["first_step_s"] = time.perf_counter() - start  # compilation, for compiled modes
        for _ in range(2):
            step()
        sync(device)
        if compiled:
            result.update(dynamo_counts())
            emit_partial(result)
        n_timed = 3 if args.quick else 20
        with gpu_lock(args.lock):
            for _ in range(2):  # warm again: the lock may have waited while others used the device
                step()
            sync(device)
            graphs_before = dynamo_counts()["graphs"] if compiled else 0
            times = []
            for _ in range(n_timed):
                start = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times)
            result.update(ms_per_step=ms, images_per_s=1000 * batch / ms, peak_memory_mb=peak_mb(device),
                          achieved_tflops=6 * macs * batch / (ms / 1000) / 1e12)
            if compiled:
                result["recompiled_while_timing"] = dynamo_counts()["graphs"] != graphs_before
            try:
                profiled = profile_steps(step, device, 3)
            except Exception as e:  # noqa: BLE001 - the timings above still count
                profiled = {"profile_error": f"{type(e).__name__}: {e}"}
            if "device_busy_ms_per_step" in profiled:
                profiled["device_busy_share"] = profiled["device_busy_ms_per_step"] / ms
            result.update(profiled)
            try:
                result.update(host_profile(trainer, step, device, 3))
            except Exception as e:  # noqa: BLE001 - the timings above still count
                result["host_profile_error"] = f"{type(e).__name__}: {e}"
            if not compiled:
                result.update(sampling(model, device, batch))
    return result


def sampling(model, device: torch.device, batch: int) -> dict:
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    model.sample(batch, 0.7, generator=generator)
    times = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        model.sample(batch, 0.7, generator=generator)
        sync(device)
        times.append(time.perf_counter() - start)
    model.train()
    return {"sample_images_per_s_t07": batch / statistics.median(times)}


def brute_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each sample of x, from the full Jacobian (fn maps (1, ...) to (1, ...))."""
    out = []
    for sample in x:
        def flat(v, sample=sample):
            y = fn(v.view(1, *sample.shape))
            return torch.cat([t.flatten() for t in y]) if isinstance(y, (list, tuple)) else y.flatten()

        jacobian = torch.autograd.functional.jacobian(flat, sample.flatten(), vectorize=True)
        out.append(torch.linalg.slogdet(jacobian)[1])
    return torch.stack(out)


def section_exact64(args, device, sizes) -> dict:
    from glowtrain.flows import ActNorm, InvConv2d, Permute, Squeeze, make_coupling
    from glowtrain.model import Glow

    torch.manual_seed(0)
    x = torch.randn(3, 12, 4, 4, device=device, dtype=torch.float64)
    layers = {"actnorm": ActNorm(12), "invconv_lu": InvConv2d(12, lu=True), "invconv_plain": InvConv2d(12, lu=False),
              "coupling_affine": make_coupling("affine", 12, 16),
              "coupling_additive": make_coupling("additive", 12, 16),
              "permute_shuffle": Permute(12, "shuffle"), "squeeze": Squeeze()}
    errors = {}
    for name, layer in layers.items():
        layer = layer.to(device, torch.float64)
        if hasattr(layer, "initialize"):
            layer.initialize(x)
        layer(x)  # ActNorms inside coupling networks initialise here
        perturb_(layer, 0.05)
        errors[name] = float((layer(x)[1] - brute_logdet(lambda v, layer=layer: layer(v)[0], x)).abs().max())
        errors[name + "_inverse"] = float((layer.reverse(layer(x)[0]) - x).abs().max())
    model = Glow((3, 8, 8), n_levels=2, n_steps=2, hidden_channels=16).to(device, torch.float64)
    images = torch.rand(3, 3, 8, 8, device=device, dtype=torch.float64) - 0.5
    model.initialize(images)
    perturb_(model, 0.02)
    zs, logdet = model.encode(images)
    errors["glow_L2_K2"] = float((logdet - brute_logdet(lambda v: model.encode(v)[0], images)).abs().max())
    errors["glow_L2_K2_inverse"] = float((model.decode(zs) - images).abs().max())
    paper = build_glow(sizes["cifar"], device).double()
    batch = 4
    images = torch.rand(batch, *sizes["cifar"][0], device=device, dtype=torch.float64) - 0.5
    paper.initialize(images)
    perturb_(paper, 0.001)
    paper.eval()
    with torch.no_grad():
        zs, _ = paper.encode(images)
        errors["paper_model_inverse"] = float((paper.decode(zs) - images).abs().max())
    logdets = {k: v for k, v in errors.items() if not k.endswith("inverse")}
    return {"max_logdet_error": max(logdets.values()), "max_inverse_error": max(
        v for k, v in errors.items() if k.endswith("inverse")), "errors": errors}


def level_shapes(image_shape, n_levels: int) -> list[tuple[int, int]]:
    """(channels, height) that each level's 1x1 convolutions mix: squeeze x4 channels, split off half after."""
    channels, height = image_shape[0], image_shape[1]
    shapes = []
    for level in range(n_levels):
        channels, height = channels * 4, height // 2
        shapes.append((channels, height))
        if level < n_levels - 1:
            channels //= 2
    return shapes


def section_mix64(args, device, sizes) -> dict:
    """What the policy's float64 1x1 convolutions cost per training step, against float32 without TF32."""
    from glowtrain.flows import mix_channels

    shape, levels, k, _, _, batch, _ = sizes["cifar"]

    def float32_mix(weight, x):
        n, c, h, w = x.shape
        return torch.matmul(weight, x.reshape(n, c, h * w)).reshape(n, c, h, w)

    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [(torch.randn(batch, channels, height, height, device=device, generator=generator, requires_grad=True),
               [torch.linalg.qr(torch.randn(channels, channels, device=device, generator=generator))[0]
                .requires_grad_() for _ in range(k)]) for channels, height in level_shapes(shape, levels)]

    def one_step(mix) -> None:  # every 1x1 convolution of the model, forward and backward
        for x, weights in inputs:
            y = x
            for weight in weights:
                y = mix(weight, y)
            y.square().sum().backward()

    result = {"levels": level_shapes(shape, levels), "steps_per_level": k, "batch": batch}
    with precision(False), gpu_lock(args.lock):
        for name, mix in (("float64", mix_channels), ("float32", float32_mix)):
            times = []
            for i in range(3 + (3 if args.quick else 10)):
                sync(device)
                start = time.perf_counter()
                one_step(mix)
                sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - start)
            result[f"{name}_ms_per_step"] = 1000 * statistics.median(times)
    result["float64_extra_ms_per_step"] = result["float64_ms_per_step"] - result["float32_ms_per_step"]
    return result


POLICIES = {
    # name: (TF32 flags as run.tf32 sets them, bf16 coupling networks, inside precision.full_float32)
    "training_tf32": (True, False, False),
    "training_tf32_off": (False, False, False),
    "training_bf16": (True, True, False),
    "inference": (True, False, True),
}


def section_roundtrip(args, device, sizes) -> dict:
    spec = sizes["cifar"]
    apply_glowtrain_device_settings(device)
    model = build_glow(spec, device)
    x = torch.rand(16, *spec[0], device=device, generator=torch.Generator(device=device).manual_seed(3)) - 0.5
    model.initialize(x)
    perturb_(model, 0.001)
    model.eval()
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        log_prob64 = reference.log_prob(x.double())
    del reference
    result = {}
    from glowtrain.precision import full_float32

    for name, (tf32, bf16, inference) in POLICIES.items():
        with precision(tf32), (full_float32() if inference else contextlib.nullcontext()), torch.no_grad():
            model.set_amp(torch.bfloat16 if bf16 else None)
            zs, _ = model.encode(x)
            decoded = model.decode(zs)
            drift = model.reconstruction_errors(x)
            log_prob = model.log_prob(x)
        result[name] = {
            "roundtrip_max_error": float((decoded - x).abs().max()),
            "memory_saving_drift": max(drift),
            "log_prob_vs_float64_bpd":
                float((log_prob.double() - log_prob64).abs().max()) / (model.n_dims * math.log(2)),
        }
    model.set_amp(None)
    return result


def synthetic_cache(root: Path, shape, n_train: int, n_test: int) -> Path:
    """A prepared-cache folder of random uint8 CIFAR-shaped images, as `glowtrain prepare` writes it."""
    import numpy as np

    from glowtrain.data import CACHE_FORMAT

    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        np.save(cache / f"{split}.npy", rng.integers(0, 256, size=(n, *shape), dtype=np.uint8))
        np.save(cache / f"{split}_labels.npy", rng.integers(0, 10, size=n, dtype=np.int64))
    index = {"format": CACHE_FORMAT, "dataset": "cifar10", "root": str(root), "image_size": shape[1],
             "channels": shape[0], "image_shape": list(shape), "n_classes": 10,
             "splits": {"train": n_train, "test": n_test}}
    (cache / "index.json").write_text(json.dumps(index))
    return cache


def fit_overrides(spec, cache: Path, device: torch.device, steps: int) -> list[str]:
    shape, levels, k, width, coupling, batch, n_bits = spec
    return [f"data.cache={cache}", f"data.image_size={shape[1]}", f"data.n_bits={n_bits}", "data.n_workers=0",
            "data.download=false", f"model.n_levels={levels}", f"model.n_steps={k}", f"model.hidden_channels={width}",
            f"model.coupling={coupling}", f"train.batch_size={batch}", f"train.steps={steps}",
            f"run.device={device}", "train.warmup_steps=10", "train.n_samples=16", "train.sample_temperatures=[0.7]",
            f"train.init_batch_size={4 * batch}", "train.eval_batch_size=256",
            "train.compile=off"]  # the eager loop: compiled throughput has its own section


class HostReads:
    """Counts host reads of tensors (item, tolist, bool, float, int) and CUDA syncs, by training step and place."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, device: torch.device):
        self.device = device
        self.step = -1  # -1: set-up before the first step
        self.reads: list[tuple[int, str]] = []
        self.syncs: list[tuple[int, str]] = []
        self._saved = {}

    @staticmethod
    def _place() -> str:
        frames = [f for f in traceback.extract_stack() if "glowtrain" + os.sep in f.filename
                  and "gpu_check" not in f.filename]
        if not frames:
            return "outside glowtrain"
        f = frames[-1]
        return f"{Path(f.filename).name}:{f.lineno} {f.name}"

    def __enter__(self):
        import glowtrain.train as train_module

        self._saved["step_generator"] = train_module.step_generator

        def step_generator(seed, step, device):
            self.step = step
            return self._saved["step_generator"](seed, step, device)

        train_module.step_generator = step_generator
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def recording(tensor, *a, _real=real, **k):
                if tensor.device.type != "cpu" or self.device.type == "cpu":
                    self.reads.append((self.step, self._place()))
                return _real(tensor, *a, **k)

            setattr(torch.Tensor, name, recording)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("always")
            self._saved["showwarning"] = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if "synchroniz" in str(message):
                    self.syncs.append((self.step, self._place()))

            warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        import glowtrain.train as train_module

        train_module.step_generator = self._saved["step_generator"]
        for name in self.NAMES:
            setattr(torch.Tensor, name, self._saved[name])
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._saved["showwarning"]
            self._warnings.__exit__(*exc)

    def summary(self, events, quiet_steps: set[int]) -> dict:
        in_quiet = [place for step, place in events if step in quiet_steps]
        places: dict[str, int] = {}
        for step, place in events:
            key = f"{'setup' if step < 0 else 'quiet step' if step in quiet_steps else 'logging/eval step'}: {place}"
            places[key] = places.get(key, 0) + 1
        # Every quiet-step place, however rare (they are what the section is for), then the commonest others.
        ranked = sorted(places.items(), key=lambda kv: (not kv[0].startswith("quiet step"), -kv[1]))
        shown = [kv for i, kv in enumerate(ranked) if kv[0].startswith("quiet step") or i < 12]
        return {"per_quiet_step": len(in_quiet) / max(len(quiet_steps), 1), "total": len(events),
                "quiet_steps_with_syncs": sorted({step for step, _ in events if step in quiet_steps}),
                "places": dict(shown)}


def section_fit(args, device, sizes) -> dict:
    import glowtrain.train as train_module
    from glowtrain.config import load_config
    from glowtrain.optim import GatedAdamax

    GatedAdamax.gate_on_cpu = True  # on a CPU, count the reads of the path accelerators take (this is a child process)
    spec = sizes["cifar"]
    steps, log_every = (12, 4) if args.quick else (60, 20)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_fit_"))
    cache = synthetic_cache(work, spec[0], n_train=spec[5] * steps, n_test=64 if args.quick else 1024)
    cfg = load_config(ROOT / "configs" / "cifar10.yaml", fit_overrides(spec, cache, device, steps) + [
        f"train.optimizer={args.variant}", f"train.log_every={log_every}", f"train.eval_every={steps}",
        f"train.sample_every={steps}", f"train.checkpoint_every={steps}"])
    real_evaluate = train_module.evaluate
    eval_times = []

    def timed_evaluate(*a, **k):
        sync(device)
        start = time.perf_counter()
        out = real_evaluate(*a, **k)
        sync(device)
        eval_times.append(time.perf_counter() - start)
        return out

    train_module.evaluate = timed_evaluate
    try:
        with gpu_lock(args.lock), HostReads(device) as reads:
            start = time.perf_counter()
            outcome = train_module.train(cfg, out=str(work / "run"), progress=False)
            total_s = time.perf_counter() - start
    finally:
        train_module.evaluate = real_evaluate
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["images_per_s"] for m in metrics if m.get("split") == "train" and "images_per_s" in m]
    busy_steps = {s for s in range(steps) if (s + 1) % log_every == 0 or s + 1 == steps}
    quiet = set(range(steps)) - busy_steps
    result = {"optimizer": args.variant, "steps": steps, "batch": spec[5], "total_s": total_s,
              "images_per_s_by_window": speeds, "test_bpd": outcome.test.get("bpd"),
              "eval_s": eval_times, "eval_images_per_s": (1024 if not args.quick else 64) / eval_times[-1]
              if eval_times else None, "host_reads": reads.summary(reads.reads, quiet)}
    if device.type == "cuda":
        result["cuda_syncs"] = reads.summary(reads.syncs, quiet)
    shutil.rmtree(work, ignore_errors=True)
    return result


def section_memory(args, device, sizes) -> dict:
    from glowtrain.losses import bits_per_dim

    spec = sizes["celebahq"]
    shape, _, _, _, _, _, n_bits = spec
    apply_glowtrain_device_settings(device)
    model = build_glow(spec, device)
    model.initialize(torch.rand(2, *shape, device=device) - 0.5)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
    result = {"image_shape": list(shape), "parameters": sum(p.numel() for p in model.parameters())}
    # One step first, so the optimiser's moments exist before any peak is measured.
    bits_per_dim(model(torch.rand(1, *shape, device=device) - 0.5)[0], model.n_dims, n_bits).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batches = {False: (1, 2) if args.quick else (2, 4), True: (1, 2) if args.quick else (4, 8)}
    for saving, sizes_ in batches.items():
        model.set_memory_saving(saving)
        peaks, times = [], []
        for batch in sizes_:
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            x = torch.rand(batch, *shape, device=device) - 0.5
            for _ in range(2):  # the second is timed: the first autotunes convolutions
                sync(device)
                start = time.perf_counter()
                log_prob, _ = model(x)
                bits_per_dim(log_prob, model.n_dims, n_bits).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
            times.append(time.perf_counter() - start)
            peaks.append(peak_mb(device) - base / 2**20)
            del x, log_prob
        per_image = (peaks[1] - peaks[0]) / (sizes_[1] - sizes_[0])
        fixed = peaks[0] - per_image * sizes_[0]
        key = "memory_saving" if saving else "standard"
        entry = {"batches": list(sizes_), "peak_mb_above_weights": peaks, "mb_per_image": per_image,
                 "ms_per_image": 1000 * times[1] / sizes_[1]}
        if device.type == "cuda":
            free_mb = torch.cuda.get_device_properties(device).total_memory / 2**20 * 0.92 \
                - torch.cuda.memory_allocated(device) / 2**20
            entry["largest_batch_estimate"] = int((free_mb - fixed) // per_image) if per_image > 0 else None
        result[key] = entry
    if result["memory_saving"]["mb_per_image"] > 0:
        result["batch_ratio"] = result["standard"]["mb_per_image"] / result["memory_saving"]["mb_per_image"]
    return result


def section_ddp(args, device, sizes) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from glowtrain.losses import bits_per_dim

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    apply_glowtrain_device_settings(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    import inspect

    takes_device_id = "device_id" in inspect.signature(dist.init_process_group).parameters
    kwargs = {"device_id": device} if device.type == "cuda" and takes_device_id else {}
    start = time.perf_counter()
    dist.init_process_group(backend, **kwargs)
    spec = sizes["small"]
    shape, batch, n_bits = spec[0], spec[5], spec[6]
    x = torch.rand(batch, *shape, device=device, generator=torch.Generator(device=device).manual_seed(0)) - 0.5
    plain = build_glow(spec, device).initialize(x)
    wrapped_model = copy.deepcopy(plain)
    wrapped = DistributedDataParallel(wrapped_model, device_ids=[device.index or 0] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    with precision(False):  # compare like with like: no TF32 rounding differences between the two
        for model, forward in ((plain, plain), (wrapped_model, wrapped)):
            optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                bits_per_dim(forward(x)[0], model.n_dims, n_bits).mean().backward()
                optimizer.step()
    flag = torch.ones(1, dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    difference = max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), wrapped_model.parameters()))
    dist.destroy_process_group()
    return {"backend": backend, "ddp_s": time.perf_counter() - start, "max_weight_difference": difference,
            "all_reduce_min_ok": int(flag.item()) == 1}


def section_resume(args, device, sizes) -> dict:
    from glowtrain.config import apply_overrides, load_config
    from glowtrain.train import train

    deterministic = args.variant == "deterministic"
    spec = sizes["small"]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_resume_"))
    cache = synthetic_cache(work, spec[0], n_train=spec[5] * 20, n_test=64)
    base = fit_overrides(spec, cache, device, 20) + ["train.log_every=5", "train.eval_every=1000",
                                                    "train.sample_every=1000", "train.checkpoint_every=10",
                                                    f"run.deterministic={str(deterministic).lower()}"]
    cfg = load_config(ROOT / "configs" / "cifar10.yaml", base)
    start = time.perf_counter()
    with gpu_lock(args.lock):
        train(cfg, out=str(work / "whole"), progress=False)
        train(apply_overrides(cfg, ["train.steps=10"]), out=str(work / "split"), progress=False)
        train(cfg, out=str(work / "split"), resume="auto", progress=False)
    whole = torch.load(work / "whole" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    split = torch.load(work / "split" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    differences = [float((a.double() - b.double()).abs().max()) for a, b in
                   zip(whole["model"].values(), split["model"].values()) if a.is_floating_point()]
    shutil.rmtree(work, ignore_errors=True)
    return {"mode": args.variant, "bit_exact": all(torch.equal(a, b) for a, b in
                                                   zip(whole["model"].values(), split["model"].values())),
            "max_weight_difference": max(differences), "three_runs_s": time.perf_counter() - start}


DEVICE_TESTS = ["tests/test_on_device.py", "tests/test_checkpoint.py", "tests/test_optim.py"]


def section_tests(args, device, sizes) -> dict:
    """The device tests in a pytest of their own (a hang is killed with this section's process group)."""
    chosen = ["tests/test_optim.py", "-k", "host_memory or bit_for_bit"] if args.quick else DEVICE_TESTS
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-o", "faulthandler_timeout=120",
               "-o", "log_level=WARNING", "--show-capture=no", *chosen]
    env = {**os.environ, "GLOWTRAIN_TEST_DEVICE": str(device), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    return {"exit_code": done.returncode, **pytest_outcome(output), "tests": chosen,
            "tail": output[-3000:] if done.returncode else ""}


def pytest_outcome(output: str) -> dict:
    """What a pytest run with -rfE says at its end: the counts of its last line and the failed tests' ids."""
    last = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", last)}
    failures = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, re.M)  # ids may hold spaces: [a, b]
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0), "errors": counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "failures": failures}


SECTION_FUNCTIONS = {"env": section_env, "tests": section_tests, "throughput": section_throughput,
                     "exact64": section_exact64, "mix64": section_mix64,
                     "roundtrip": section_roundtrip, "fit": section_fit, "memory": section_memory,
                     "ddp": section_ddp, "resume": section_resume}


def child(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    result = SECTION_FUNCTIONS[args.child](args, device, sizes)
    result["section_s"] = round(time.perf_counter() - start, 2)
    print(RESULT + json.dumps(result, default=str), flush=True)


# --------------------------------------------------------------------------------------------------
# The parent: runs the sections under one deadline and writes the report
# --------------------------------------------------------------------------------------------------

def child_command(args, section: str, variant: str, lock: str) -> list[str]:
    command = [sys.executable, __file__, "--child", section, "--variant", variant, "--device", args.device,
               "--lock", lock]
    return command + (["--quick"] if args.quick else [])


def parse_child_output(stdout: str) -> tuple[dict | None, dict | None]:
    final = partial = None
    for line in stdout.splitlines():
        if line.startswith(RESULT):
            final = json.loads(line[len(RESULT):])
        elif line.startswith(PARTIAL):
            partial = json.loads(line[len(PARTIAL):])
    return final, partial


def finish(section: str, variant: str, returncode: int | None, stdout: str, stderr: str, seconds: float) -> dict:
    final, partial = parse_child_output(stdout)
    row = {"section": section, "variant": variant, "seconds": round(seconds, 1)}
    if final is not None and returncode == 0:
        row.update(status="ok", **final)
    else:
        row["status"] = "timeout" if returncode is None else f"failed (exit {returncode})"
        if partial:
            row.update(partial)
        row["error"] = (stderr or "")[-1500:]
    return row


def compile_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // 4)))
    return env


def run_all(args, plan_fg, plan_bg, deadline: float, report) -> None:
    lock = tempfile.NamedTemporaryFile(prefix="gpu_check_lock_", delete=False).name

    def run(section: str, variant: str, **popen) -> None:
        left = deadline - time.perf_counter()
        if left < 5:
            report({"section": section, "variant": variant, "status": "skipped: deadline reached"})
            return
        start = time.perf_counter()
        process = subprocess.Popen(child_command(args, section, variant, lock), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
        report(finish(section, variant, *collect(process, left), time.perf_counter() - start))

    def run_background():  # one compiler at a time: side by side they starve each other past the deadline
        for section, variant in plan_bg:
            run(section, variant, env=compile_env(), preexec_fn=lambda: os.nice(10))

    background = threading.Thread(target=run_background, daemon=True)
    if args.jobs > 1:  # a smoke run: sections side by side, each on its share of the cores; compiles beside them
        background.start()
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda row: run(*row, env={**os.environ, "OMP_NUM_THREADS": threads}), plan_fg))
    for section, variant in plan_fg if args.jobs == 1 else []:
        if background.ident is None and section not in ("env", "throughput"):
            background.start()  # after the eager timings, so compiling cannot slow what they measure
        run(section, variant)
    if background.ident is None:
        background.start()
    background.join()
    os.unlink(lock)


def collect(process: subprocess.Popen, timeout: float) -> tuple[int | None, str, str]:
    """(exit code, or None when it was stopped at the deadline; stdout; stderr)."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        # The whole process group: compile workers it started would otherwise keep the pipes open.
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def headline(row: dict) -> str:
    """The one-line summary of a section's result for the markdown table."""
    s = row["section"]
    if not row.get("status", "").startswith("ok"):
        extra = f"; first step {row['first_step_s']:.0f} s, {row.get('graphs')} graphs" if "first_step_s" in row else ""
        return row.get("status", "") + extra
    if s == "env":
        return (f"{row.get('device_name', 'CPU')} (cc {row.get('capability', '-')}), torch {row['torch']}, "
                f"CUDA {row['cuda_runtime']}, cuDNN {row['cudnn']}, bf16 {row.get('bf16_supported')}")
    if s == "throughput":
        text = f"{row['images_per_s']:.0f} img/s, {row['ms_per_step']:.1f} ms/step, peak {row['peak_memory_mb']:.0f} MB"
        if "kernels_per_step" in row:
            text += (f", {row['kernels_per_step']:.0f} kernels and {row['launches_per_step']:.0f} launches/step, "
                     f"GPU busy {row['device_busy_share']:.0%}, {row['host_syncs_per_step']:.1f} syncs/step")
        if "host_ms_by_part" in row:
            parts = ", ".join(f"{part} {ms:.1f}" for part, ms in list(row["host_ms_by_part"].items())[:3])
            text += f", host {row['host_ms_per_step']:.1f} ms/step ({parts})"
        if "graphs" in row:
            text += f", {row['graphs']} graphs / {row['graph_breaks']} breaks, first step {row['first_step_s']:.0f} s"
        if "sample_images_per_s_t07" in row:
            text += f", sampling {row['sample_images_per_s_t07']:.0f} img/s"
        return text
    if s == "tests":
        failed = f", {row['failed']} failed ({', '.join(row['failures'])})" if row["failures"] else ""
        return f"{row['passed']} passed{failed}, {row['skipped']} skipped (exit {row['exit_code']})"
    if s == "exact64":
        return f"log-det error {row['max_logdet_error']:.1e}, inverse error {row['max_inverse_error']:.1e}"
    if s == "mix64":
        return (f"1x1 convolutions per training step: {row['float64_ms_per_step']:.1f} ms in float64, "
                f"{row['float32_ms_per_step']:.1f} ms in float32 without TF32")
    if s == "roundtrip":
        return "; ".join(f"{k}: {v['roundtrip_max_error']:.1e} round trip, {v['memory_saving_drift']:.1e} drift"
                         for k, v in row.items() if isinstance(v, dict) and "roundtrip_max_error" in v)
    if s == "fit":
        syncs = row.get("cuda_syncs", row["host_reads"])
        return (f"{row['images_per_s_by_window'][-1]:.0f} img/s (last window), "
                f"{syncs['per_quiet_step']:.2f} syncs per non-logging step, "
                f"eval {row['eval_images_per_s'] or 0:.0f} img/s")
    if s == "memory":
        std, ms = row["standard"], row["memory_saving"]
        return (f"{std['mb_per_image']:.0f} MB/image standard (largest batch {std.get('largest_batch_estimate')}), "
                f"{ms['mb_per_image']:.0f} MB/image memory saving (largest {ms.get('largest_batch_estimate')}), "
                f"ratio {row.get('batch_ratio', 0):.1f}x; "
                f"{std['ms_per_image']:.0f} vs {ms['ms_per_image']:.0f} ms/image")
    if s == "ddp":
        return (f"{row['backend']}: weights differ by {row['max_weight_difference']:.1e}, "
                f"all-reduce ok {row['all_reduce_min_ok']}")
    if s == "resume":
        return f"bit-exact {row['bit_exact']}, max weight difference {row['max_weight_difference']:.1e}"
    return ""


def chosen(row: tuple[str, str], only: list[str] | None, skip: list[str]) -> bool:
    """Whether --only and --skip (each a list of SECTION or SECTION:VARIANT) leave (section, variant) in."""
    names = {row[0], f"{row[0]}:{row[1]}"}
    return (only is None or bool(names & set(only))) and not names & set(skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models: checks the script, not the device")
    parser.add_argument("--only", nargs="+", choices=SECTIONS + VARIANTS, metavar="SECTION[:VARIANT]",
                        help=f"run only these sections or variants: {', '.join(SECTIONS + VARIANTS)}")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS + VARIANTS, default=[], metavar="SECTION[:VARIANT]",
                        help="leave these sections or variants out")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled throughput runs")
    parser.add_argument("--deadline", type=float, default=470.0, help="seconds until every section must be done")
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--jobs", type=int, default=1, choices=range(1, 17), metavar="N",
                        help="run N sections at once, each on its share of the cores: a quicker smoke run whose "
                             "timings mean nothing (the test suite's --device cpu --quick)")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    parser.add_argument("--lock", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    deadline = time.perf_counter() + args.deadline
    plan_fg = [row for row in FOREGROUND if chosen(row, args.only, args.skip)]
    plan_bg = [] if args.no_compile else [row for row in BACKGROUND if chosen(row, args.only, args.skip)]
    if not plan_fg and not plan_bg:
        parser.error("--only, --skip and --no-compile leave nothing to run")  # exit 2, before a device call is spent
    rows = []
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    reporting = threading.Lock()  # the background compiles report from their own thread

    def report(row: dict) -> None:
        with reporting:
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            if out:  # rewritten after every section, so a killed run still leaves what it had
                (out / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")

    run_all(args, plan_fg, plan_bg, deadline, report)
    order = {row: i for i, row in enumerate(FOREGROUND + BACKGROUND)}
    rows.sort(key=lambda row: order[row["section"], row["variant"]])  # as planned, however they finished
    if out:
        (out / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    table = ["| section | variant | status | seconds | result |", "|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['section']} | {row.get('variant', '')} | {row['status'].split(':')[0]} "
                     f"| {row.get('seconds', '')} | {headline(row)} |")
    print("\n".join(table))
    if out:
        (out / "gpu_check.md").write_text("\n".join(table) + "\n")
    failed = [r for r in rows if r["status"] != "ok"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
