"""Constant-memory backward through chains of invertible layers: rebuild inputs instead of storing them.

Every Glow layer is invertible, so backward can recover each layer's input from its output, as
reversible residual networks do (Gomez et al., "The Reversible Residual Network", 2017) and as the
reference Glow does to train on 256x256 faces. `reversible_chain` runs a chain of layers with
autograd off, keeps only the chain's output, and in backward walks the layers from the last:
reconstruct the layer's input and redo that one layer under autograd (`FlowLayer.reverse_and_recompute`:
reverse then forward, or a layer's cheaper combined form), backpropagate through it, let go.
Activation memory is then one layer's graph instead of the whole chain's.

Numerical drift of the reconstruction is measured (`reconstruction_error` here, `Glow.reconstruction_errors` per
level), not assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from glowtrain.flows import ActNorm, FlowLayer, FlowSequence

P, T = ParamSpec("P"), TypeVar("T")


def flat_layers(module: FlowLayer) -> list[FlowLayer]:
    """The elementary layers of a (nested) FlowSequence, in forward order."""
    if isinstance(module, FlowSequence):
        return [leaf for layer in module.layers for leaf in flat_layers(layer)]
    return [module]


def is_initialized(module: nn.Module) -> bool:
    """Whether every ActNorm inside `module` has had its data-dependent init."""
    return all(m.is_initialized for m in module.modules() if isinstance(m, ActNorm))


class _ReversibleChain(torch.autograd.Function):
    """(x, chain, *params) -> chain(x); `params` are inputs so their gradients reach `.grad` as usual."""

    @staticmethod
    def forward(ctx, x, chain, *params):
        # Custom Function forwards run with autograd off: nothing inside the chain is recorded. The
        # chain itself runs (not its flattened layers), so log-dets add up in the standard order. Detached,
        # so every step inside sees an input that needs no gradient (one compiled graph per level, not two).
        h, logdet = chain(x.detach())
        ctx.layers = flat_layers(chain)
        ctx.slot = {id(p): i for i, p in enumerate(params)}  # where each parameter's gradient goes
        # The backward engine may run on another thread, where autocast is off: record it to replay.
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(h)  # all that backward needs: every earlier activation is rebuilt from it
        return h, logdet

    @staticmethod
    @once_differentiable  # gradients of gradients would need the rebuilt graphs kept: not supported
    def backward(ctx, grad_y, grad_logdet):
        (y,) = ctx.saved_tensors
        y = y.detach()
        slot = ctx.slot
        param_grads: list[torch.Tensor | None] = [None] * len(slot)
        need_input_grad = ctx.needs_input_grad[0]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            for position in reversed(range(len(ctx.layers))):
                layer = ctx.layers[position]
                want_input_grad = position > 0 or need_input_grad
                parts, y_new, logdet_new = layer.reverse_and_recompute(y, want_input_grad)
                params = [p for p in layer.parameters() if id(p) in slot]
                inputs = ([q for q in parts if q.requires_grad] if want_input_grad else []) + params
                pairs = [(o, g) for o, g in ((y_new, grad_y), (logdet_new, grad_logdet)) if o.requires_grad]
                grads = [None] * len(inputs)
                if inputs and pairs:
                    outputs, grad_outputs = zip(*pairs)
                    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
                n_parts = len(inputs) - len(params)
                for param, grad in zip(params, grads[n_parts:]):
                    if grad is not None:
                        i = slot[id(param)]
                        param_grads[i] = grad if param_grads[i] is None else param_grads[i] + grad
                if want_input_grad:
                    grad_y = _join_grads(parts, grads[:n_parts])
                y = torch.cat([q.detach() for q in parts], 1) if len(parts) > 1 else parts[0].detach()
                del parts, y_new, logdet_new, grads
        return (grad_y if need_input_grad else None, None, *param_grads)


def _join_grads(parts: list[torch.Tensor], grads) -> torch.Tensor:
    """Gradient with respect to the concatenated input, zeros where a part had none."""
    grads = iter(grads)
    pieces = []
    for part in parts:
        grad = next(grads) if part.requires_grad else None
        pieces.append(torch.zeros_like(part) if grad is None else grad)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def _eager_under_compile(function: Callable[P, T]) -> Callable[P, T]:
    """torch.compiler.disable, applied at the first call rather than at import: importing torch's compiler takes
    seconds, which every command would pay at start-up, and only runs that save memory call this."""
    disabled = None

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(function)
        return disabled(*args, **kwargs)

    return call


@_eager_under_compile  # torch.compile runs the rest of the model; this part stays eager
def reversible_chain(chain: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (y, logdet) as `chain(x)`, with a backward that stores only y and rebuilds the rest.

    Every ActNorm in `chain` must already be initialised (the caller falls back to `chain(x)` first).
    """
    params = [p for p in chain.parameters() if p.requires_grad]
    return _ReversibleChain.apply(x, chain, *params)


@torch.no_grad()
def reconstruction_error(chain: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(max |true input - rebuilt input| over every layer of `chain`, chain output) for input x.

    Runs forward keeping each layer's true input, then rebuilds the inputs from the output exactly as
    the memory-saving backward does, layer by layer in reverse.
    """
    layers = flat_layers(chain)
    inputs = []
    h = x
    for layer in layers:
        inputs.append(h)
        h, _ = layer(h)
    output = h
    worst = x.new_zeros(())
    for layer, true_input in zip(reversed(layers), reversed(inputs)):
        h = layer.reverse(h)
        worst = torch.maximum(worst, (h - true_input).abs().max())
    return float(worst), output
