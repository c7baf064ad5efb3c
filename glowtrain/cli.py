"""The `glowtrain` command line: parses options, calls one library function, maps errors to exit codes."""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Annotated, Optional

import typer

from glowtrain import __version__
from glowtrain.errors import UserError

EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130

app = typer.Typer(
    name="glowtrain",
    help="Train Glow normalizing flows on images: fit, sample, and inspect likelihood models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"glowtrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _errors_to_exit_codes(command):
    """UserError -> one line on stderr and exit 2; interruption -> exit 130; anything else -> exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from glowtrain.train import Interrupted  # late: keeps `glowtrain --help` fast

        try:
            return command(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                traceback.print_exc()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Interrupted as e:
            typer.echo(f"interrupted at step {e.args[0]}; checkpoint saved. Continue with: "
                       f"glowtrain fit --resume auto {' '.join(_resume_hint_args())}".rstrip(), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if _state["debug"]:
                traceback.print_exc()
            else:
                typer.echo(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(EXIT_FAILURE) from None

    return wrapper


def _resume_hint_args() -> list[str]:
    args = sys.argv[1:]
    keep = []
    for i, arg in enumerate(args):
        if arg in ("--out", "--config") and i + 1 < len(args):
            keep += [arg, args[i + 1]]
    return keep


@app.command()
@_errors_to_exit_codes
def fit(
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config; default: bundled digits.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key: --set train.lr=5e-4 (repeatable).")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'auto' (the run's last.pt) or a checkpoint path.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run directory; default runs/<run.name>.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """Train a model. With no --config, trains the bundled 8x8 digits in a few minutes on a CPU."""
    from glowtrain.train import fit_config, train

    cfg = fit_config(config, set_ or [], out, resume)
    result = train(cfg, out=out, resume=resume, progress=progress)
    run_dir = result["run_dir"]
    if "test_bpd" in result:
        typer.echo(f"test bpd {result['test_bpd']:.4f} at step {result['step']}")
    typer.echo(f"run directory:  {run_dir}")
    typer.echo(f"checkpoints:    {run_dir}/checkpoints/last.pt (and best.pt)")
    typer.echo(f"samples:        {run_dir}/samples/")
    typer.echo(f"tensorboard:    tensorboard --logdir {run_dir}/tb")


@app.command()
@_errors_to_exit_codes
def sample(
    run: Annotated[Optional[str], typer.Option("--run", help="Run directory; default: the most recent run.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="A checkpoint file instead of a run.")] = None,
    temp: Annotated[Optional[list[float]], typer.Option("--temp", "-t", help="Temperature (repeatable).")] = None,
    n: Annotated[int, typer.Option("--n", help="Images per grid.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; same seed, same images.")] = 0,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for the PNGs; default <run>/samples.")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights, not the EMA.")] = False,
) -> None:
    """Sample image grids (PNG) from a trained model at one or more temperatures."""
    from glowtrain.sample import sample_command
    from glowtrain.train import resolve_device

    paths = sample_command(run, checkpoint, temp or [0.7], n, seed, out, str(resolve_device(device)), not no_ema)
    for path in paths:
        typer.echo(str(path))


def main() -> None:
    app(prog_name="glowtrain")
