"""Shared test helpers: brute-force Jacobians, random non-identity weights, CLI invocation."""

import torch
from typer.testing import CliRunner

from glowtrain.cli import app

runner = CliRunner()

# The tiny run that several modules only read: a CLI `glowtrain fit` of 4 steps on the bundled digits.
TINY_RUN = [
    "model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
    "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
    "train.steps=4", "train.log_every=2", "train.eval_every=4", "train.sample_every=4",
    "train.checkpoint_every=4", "train.n_samples=4", "train.warmup_steps=2", "run.device=cpu",
]


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


def invoke(*args):
    """Run the CLI in-process with CliRunner (arguments may be paths)."""
    return runner.invoke(app, [str(a) for a in args])


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def assert_one_line_error(result, code: int = 2, *needles: str) -> str:
    """Exit `code`, no traceback, exactly one `error:` line on stderr containing every needle."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]
