"""Shared test helpers: brute-force Jacobians and random non-identity weights."""

import torch


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its (often identity-making) initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.add_(scale * noise.to(param.dtype))


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample, from the full autograd Jacobian of fn on each sample alone."""
    values = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(lambda s: fn(s.unsqueeze(0)).flatten(), sample)
        values.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(values)
