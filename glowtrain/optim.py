"""Optimisers that skip a non-finite step on the device, and restoring their state from checkpoints."""

from __future__ import annotations

import torch

from glowtrain.config import Config


class GatedAdamax(torch.optim.Adamax):
    """Adamax that leaves weights, moments and step counts exactly as they were when `found_inf` is set.

    `found_inf` is a 0-d tensor on the parameters' device (1.0: skip this step), the flag torch's fused
    Adam honours too, so the training loop never waits for the GPU to learn whether a step was finite.
    The update is torch's Adamax, written with foreach kernels gated by that flag; state dicts are
    torch.optim.Adamax's, so either loads the other's checkpoints.
    """

    skips_on_device = True
    # On a CPU, reading the flag costs nothing and torch's own per-tensor update is about twice as fast as
    # the gated form (measured on the paper CIFAR model's 44M parameters), so CPUs read it; tests set this
    # to check the accelerator path on a CPU.
    gate_on_cpu = False

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)
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
        for group in self.param_groups:
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for params in by_kind.values():
                self._step_params(group, params)
        return None

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device:  # loaded from a checkpoint, where counts live on the CPU
            state["step"] = state["step"].to(p.device, torch.float32)
        return state

    def _step_params(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        states = [self._state_of(p) for p in params]
        steps = [s["step"] for s in states]
        exp_avgs, exp_infs = [s["exp_avg"] for s in states], [s["exp_inf"] for s in states]
        device = params[0].device
        go = torch.ones((), device=device) if self.found_inf is None else 1.0 - self.found_inf.to(device).reshape(())
        go_flag = go > 0
        grads = _zeroed_unless([p.grad for p in params], go_flag)
        go = go.to(params[0].dtype)
        # Each state moves by (new - old) * go: go = 0 leaves it bit for bit; go = 1 is torch's formula.
        delta = torch._foreach_sub(grads, exp_avgs)
        torch._foreach_mul_(delta, (1.0 - beta1) * go)
        torch._foreach_add_(exp_avgs, delta)
        torch._foreach_mul_(exp_infs, torch.where(go_flag, torch.full_like(go, beta2), torch.ones_like(go)))
        magnitude = torch._foreach_abs(grads)
        torch._foreach_add_(magnitude, group["eps"])
        torch._foreach_mul_(magnitude, go)  # 0 when skipping, and max(exp_inf, 0) is exp_inf
        torch._foreach_maximum_(exp_infs, magnitude)
        # A list, not the 0-d `go` itself: torch's binding would take that for a number and read it on the host.
        torch._foreach_add_(steps, [go.float()] * len(steps))
        # -lr / (1 - beta1^t) per parameter, 0 when skipping; t >= 1 so that a skipped first step is 0, not 0/0.
        step_sizes = torch._foreach_pow(beta1, torch._foreach_clamp_min([s.to(go.dtype) for s in steps], 1.0))
        torch._foreach_sub_(step_sizes, 1.0)
        torch._foreach_reciprocal_(step_sizes)
        torch._foreach_mul_(step_sizes, group["lr"] * go)
        # exp_inf is at least eps after any taken step; clamped so a skipped first step divides 0 by eps.
        update = torch._foreach_div(exp_avgs, torch._foreach_clamp_min(exp_infs, group["eps"]))
        torch._foreach_mul_(update, step_sizes)
        torch._foreach_add_(params, update)


def _zeroed_unless(grads: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """The gradients, or zeros where `keep` is false: NaN times 0 is NaN, so a gate needs clean inputs.

    One flat `where` over all of them: a handful of kernels whatever the number of parameters."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    return [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]


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
