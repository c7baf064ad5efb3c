"""Optimisers that skip a non-finite step on the device, and restoring their state from checkpoints."""

from __future__ import annotations

import operator

import torch

from glowtrain.config import Config


class GatedAdamax(torch.optim.Adamax):
    """Adamax that leaves weights, moments and step counts exactly as they were when `found_inf` is set.

    `found_inf` is a 0-d tensor on the parameters' device (1.0: skip this step), the flag torch's fused
    Adam honours too, so the training loop never waits for the GPU to learn whether a step was finite.
    The update is torch's Adamax, gated by that flag and run over one flat buffer per device and dtype (a
    handful of kernels whatever the number of parameters); the per-parameter state is views into those
    buffers, so state dicts are torch.optim.Adamax's and either loads the other's checkpoints.
    """

    skips_on_device = True
    # On a CPU, reading the flag costs nothing and torch's own update is several times as fast as the gated
    # form (measured on the paper CIFAR model's 44M parameters: a CPU pays for every page of the gated form's
    # large temporaries), so CPUs read it; tests set this to check the accelerator path on a CPU. Its foreach
    # form (torch's default only on GPUs) takes 5.0-5.3 ms for the digits default against 7.1-7.7, one thread,
    # and ends at the same weights to the bit.
    gate_on_cpu = False

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=True)
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("GatedAdamax.step takes no closure")
        on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        if on_cpu and not self.gate_on_cpu:
            if self.found_inf is None or not bool(self.found_inf):
                super().step()
            return None
        for index, group in enumerate(self.param_groups):
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for kind, params in by_kind.items():
                self._step_params(group, params, self._flat_state((index, *kind), params))
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.pop("_flat", None)  # the loaded tensors replace the flat buffers: free them now
        super().load_state_dict(state_dict)

    def _flat_state(self, key: tuple, params: list[torch.Tensor]) -> _FlatState:
        """The flat state of `params` (group, device, dtype: `key`), rebuilt when the parameters stepped
        changed or their state no longer is its views (a loaded state dict, say)."""
        flats = self.__dict__.setdefault("_flat", {})  # an attribute a pickled optimizer may lack
        flat = flats.get(key)
        if flat is not None and flat.holds(params, self.state):
            return flat
        if flat is not None:
            flat.release(params, self.state)
        flat = flats[key] = _FlatState(params, [self.state.get(p) for p in params])
        for p, step, exp_avg, exp_inf in zip(params, flat.step_views, flat.exp_avgs, flat.exp_infs):
            self.state[p].update(step=step, exp_avg=exp_avg, exp_inf=exp_inf)
        return flat

    def _step_params(self, group: dict, params: list[torch.Tensor], flat: _FlatState) -> None:
        beta1, beta2 = group["betas"]
        device = params[0].device
        go = torch.ones((), device=device) if self.found_inf is None else 1.0 - self.found_inf.to(device).reshape(())
        go_flag = go > 0
        grads = _zeroed_unless([p.grad for p in params], go_flag)
        go = go.to(params[0].dtype)
        # Two flat temporaries, each reused: a GPU's allocator would recycle more, but a CPU faults in every
        # page of a new buffer this size, and either way the step's peak memory stays low.
        work = torch.sub(grads, flat.exp_avg)
        # Each state moves by (new - old) * go: go = 0 leaves it bit for bit; go = 1 is torch's formula.
        work.mul_((1.0 - beta1) * go)
        flat.exp_avg.add_(work)
        flat.exp_inf.mul_(torch.where(go_flag, torch.full_like(go, beta2), torch.ones_like(go)))
        magnitude = grads.abs_()  # the gradients are not needed any more
        magnitude.add_(group["eps"])
        magnitude.mul_(go)  # 0 when skipping, and max(exp_inf, 0) is exp_inf
        torch.maximum(flat.exp_inf, magnitude, out=flat.exp_inf)
        flat.steps.add_(go.float())
        step_sizes = _step_sizes(flat.steps.to(go.dtype), beta1, group["lr"] * go)
        # exp_inf is at least eps after any taken step; clamped so a skipped first step divides 0 by eps.
        update = torch.div(flat.exp_avg, torch.clamp_min(flat.exp_inf, group["eps"], out=work), out=magnitude)
        # Each parameter's step size over its elements; output_size spares the device a read of the total.
        spread = torch.repeat_interleave(flat.numels, output_size=update.numel())
        update.mul_(torch.index_select(step_sizes, 0, spread, out=work))
        torch._foreach_add_(params, torch._C._nn.unflatten_dense_tensors(update, params))


class _FlatState:
    """Adamax's moments and step counts for a list of parameters of one device and dtype, each in one flat
    buffer (in the parameters' order, elements in each one's logical order: a non-contiguous parameter still
    steps right, on per-tensor kernels); `step_views`, `exp_avgs` and `exp_infs` are the per-parameter views
    the optimiser's state holds."""

    def __init__(self, params: list[torch.Tensor], states: list[dict | None]):
        device, dtype = params[0].device, params[0].dtype
        self.params = params
        total = sum(p.numel() for p in params)
        # Repeat counts for spreading the step sizes over the elements; int32 halves that index's traffic.
        index_dtype = torch.int32 if total < 2**31 else torch.int64
        self.numels = _written_on(device, [p.numel() for p in params], index_dtype)
        self.exp_avg = torch.zeros(total, dtype=dtype, device=device)
        self.exp_inf = torch.zeros(total, dtype=dtype, device=device)
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=device)
        self.exp_avgs = torch._C._nn.unflatten_dense_tensors(self.exp_avg, params)
        self.exp_infs = torch._C._nn.unflatten_dense_tensors(self.exp_inf, params)
        self.step_views = self.steps.unbind()
        held = [(i, state) for i, state in enumerate(states) if state]  # earlier steps' or a loaded state
        if held:  # torch.optim.Adamax's tensors, or views of another flat state: copied in once
            self._take_step_counts(held, device)
            torch._foreach_copy_([self.exp_avgs[i] for i, _ in held], [s["exp_avg"] for _, s in held])
            torch._foreach_copy_([self.exp_infs[i] for i, _ in held], [s["exp_inf"] for _, s in held])

    def _take_step_counts(self, held: list[tuple[int, dict]], device: torch.device) -> None:
        """The held states' step counts into `steps`: those on `device` copied there, those in host memory (a
        loaded torch.optim.Adamax state's) written as numbers, as `_written_on` does."""
        def is_here(step) -> bool:
            return torch.is_tensor(step) and step.device == device

        here = [(i, s["step"]) for i, s in held if is_here(s["step"])]
        if here:
            torch._foreach_copy_([self.step_views[i] for i, _ in here], [step for _, step in here])
        host = [(i, float(s["step"])) for i, s in held if not is_here(s["step"])]
        if host:  # onto zeros
            torch._foreach_add_([self.step_views[i] for i, _ in host], [count for _, count in host])

    def holds(self, params: list[torch.Tensor], state: dict) -> bool:
        """Whether these are the parameters it was built for and their state is still its views (host checks)."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        return all(s is not None and s.get("exp_avg") is avg and s.get("exp_inf") is inf and s.get("step") is step
                   for s, avg, inf, step in zip(map(state.get, params), self.exp_avgs, self.exp_infs,
                                                self.step_views))

    def release(self, params: list[torch.Tensor], state: dict) -> None:
        """Give parameters no longer stepped together with `params` state of their own, so these buffers can go."""
        stepped = set(map(id, params))
        for p, step, exp_avg, exp_inf in zip(self.params, self.step_views, self.exp_avgs, self.exp_infs):
            own = state.get(p)
            if id(p) in stepped or own is None:
                continue
            for key, view in (("step", step), ("exp_avg", exp_avg), ("exp_inf", exp_inf)):
                if own.get(key) is view:
                    own[key] = view.clone()


def _written_on(device: torch.device, values: list[int], dtype: torch.dtype) -> torch.Tensor:
    """`values` as a vector on `device`, each written by a kernel that takes it as an argument: torch copies host
    memory to a GPU only after all the work queued there (the H200 found the first step waiting so)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    vector = torch.zeros(len(values), dtype=dtype, device=device)
    if values:
        torch._foreach_add_(list(vector.unbind()), values)
    return vector


def _step_sizes(counts: torch.Tensor, beta1: float, scale: torch.Tensor) -> torch.Tensor:
    """scale / (beta1^t - 1) per parameter (-lr / (1 - beta1^t), 0 when skipping), from the step counts t.

    t >= 1 so that a skipped first step is 0, not 0/0. The powers are taken over a strided copy of the
    counts: over a contiguous vector a CPU's SIMD pow may differ in the last bit from the scalar pow that
    the rest of the vector (and each 0-d count of torch's Adamax) gets, and a parameter's step must not
    depend on where it sits in the list.
    """
    exponents = torch.empty((len(counts), 2), dtype=counts.dtype, device=counts.device)[:, 0]
    torch.clamp_min(counts, 1.0, out=exponents)
    step_sizes = torch.pow(beta1, exponents)
    step_sizes.sub_(1.0)
    step_sizes.reciprocal_()
    step_sizes.mul_(scale)
    return step_sizes


def _zeroed_unless(grads: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The gradients in one flat vector, zeros where `keep` is false: NaN times 0 is NaN, so a gate needs
    clean inputs. Always a new tensor, which the caller may overwrite."""
    flat = torch._C._nn.flatten_dense_tensors(grads)  # a view of the one gradient when it is alone
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    return torch.where(keep, flat, zero, out=flat if len(grads) > 1 else None)


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """The configured optimiser, one that skips a non-finite step on the device by itself where it can.

    torch's fused Adam and GatedAdamax both take a `found_inf` flag and leave weights, moments and step
    count alone when it is set, so the loop need not wait for the GPU to learn whether a step was finite.
    """
    params = list(params)
    if cfg.train.optimizer == "adam":
        try:
            return torch.optim.Adam(params, lr=cfg.train.lr, fused=True)
        except (RuntimeError, ValueError):  # a device without a fused Adam (or an older torch)
            return torch.optim.Adam(params, lr=cfg.train.lr)
    return GatedAdamax(params, lr=cfg.train.lr)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` honours `found_inf` itself (else the loop must read the verdict on the host)."""
    return getattr(optimizer, "skips_on_device", False) or bool(optimizer.param_groups[0].get("fused"))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load saved moments and counts, keeping this run's implementation choice.

    torch restores every saved group setting, `fused` included: a checkpoint from an unfused Adam
    would silently unfuse this one (whose on-device skip then fails), and the reverse.
    """
    groups = [{**group, **{key: current[key] for key in ("fused", "foreach") if key in current}}
              for group, current in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})
