"""Shared test helpers: brute-force Jacobians, random non-identity weights, CLI invocation."""

import pytest
import torch
from typer.testing import CliRunner

from glowtrain.cli import app

runner = CliRunner()


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


@pytest.fixture
def float64_default():
    """Build and run in float64 for the duration of a test (the brute-force checks need it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


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
