"""The `glowtrain` commands: each parses its options, calls one library function and ends through `process`."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from glowtrain import __version__
from glowtrain.cli import job, process
from glowtrain.errors import UserError


def _hide_flag_value_types() -> None:
    """Recent typer's rich help prints a type after every flag (`--help <bool>`), as if flags took a value:
    show nothing there for flags. A no-op on typer versions without that method."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "hides_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)
    display_type_rich.hides_flags = True
    option.display_type_rich = display_type_rich


_hide_flag_value_types()

app = typer.Typer(
    name="glowtrain",
    help="Train Glow normalizing flows on images: fit, sample, and inspect likelihood models.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    process.state["debug"] = debug
    process.torch_log_lines(debug)


@app.command()
@process.errors_to_exit_codes
def fit(
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", metavar="PATH", help="YAML config; default: bundled digits.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a key: --set train.lr=5e-4 (repeatable).")] = None,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="auto|if-any|PATH",
        help="'auto' (the run's last.pt), 'if-any' (auto when there is one), a checkpoint path, or a run "
             "directory (its last.pt).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="DIR",
        help="Run directory; default runs/<run.name>.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
    nproc: Annotated[int, typer.Option("--nproc", metavar="N",
        help="Processes (GPUs) on this machine; >1 launches torchrun.")] = 1,
) -> None:
    """Train a model. With no --config, trains the bundled 8x8 digits in a few minutes on a CPU."""
    from glowtrain.distributed import check_process_count, launched_by_torchrun, leave_pid, stop_with_launcher
    from glowtrain.runs import RunDir
    from glowtrain.train import fit_config, resolve_resume, train

    _refuse_an_empty_out(out, "runs/<run.name>")
    resume = resolve_resume(resume, config, set_ or [], out)
    cfg = fit_config(config, set_ or [], out, resume)  # bad input fails here, before any process starts
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    check_process_count(nproc, cfg.run.device)
    if os.environ.get(process.JOB_REPORTS) and "RANK" in os.environ:  # a process of `fit --nproc`
        leave_pid(os.environ[process.JOB_REPORTS], os.environ["RANK"])
        stop_with_launcher(int(os.environ[process.LAUNCHER_PID]))
    if nproc > 1 and not launched_by_torchrun():
        job.run_processes(nproc, job.without_option(sys.argv[1:], "--nproc"))
        return
    result = train(cfg, out=out, resume=resume, progress=progress)
    process.trained()
    if result.rank != 0:
        return
    run_dir = result.run_dir
    if result.timed_out:
        typer.echo(f"stopped at step {result.step} of {cfg.train.steps}: train.max_time ({cfg.train.max_time}) is used "
                   f"up; checkpoint saved. Continue with: {process.resume_command(run_dir)} (it stops after "
                   f"{cfg.train.max_time} again: the run keeps its max_time; --set train.max_time='' lifts it)")
    if "bpd" in result.test:
        typer.echo(f"test bpd {result.test['bpd']:.4f} at step {result.test['step']}")  # maybe before a stop
    typer.echo(f"run directory:  {shlex.quote(run_dir)}")  # quoted, so that every path pastes into a shell
    paths = RunDir(run_dir)
    best = (" (and best.pt)" if paths.best.is_file() else "" if math.isfinite(result.best_test_bpd) else
            " (no best.pt yet: it stopped before an evaluation)" if not result.test else
            " (no best.pt: no evaluation gave a finite test bpd)")
    typer.echo(f"checkpoints:    {shlex.quote(str(paths.last))}{best}")
    if paths.samples.is_dir():  # a stop (train.max_time) before the first sample step has none
        typer.echo(f"samples:        {shlex.quote(f'{paths.samples}/')}")
    if paths.tb.is_dir():
        typer.echo(f"tensorboard:    tensorboard --logdir {shlex.quote(str(paths.tb))}")


ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars (stderr).")]
RunOption = Annotated[Optional[str], typer.Option("--run", metavar="DIR",
    help="Run directory; default: the most recent under runs/.")]
CheckpointOption = Annotated[Optional[str], typer.Option("--checkpoint", metavar="PATH",
    help="A checkpoint file instead of a run.")]
DeviceOption = Annotated[str, typer.Option("--device", metavar="DEVICE",
    help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")]
SeedOption = Annotated[int, typer.Option("--seed", metavar="N", min=0, max=2**32 - 1,  # config.SEED_LIMIT - 1
    help="Random seed; the same seed gives the same output.")]
# eval, reconstruct, interpolate and manipulate draw nothing at random (the first test images, eval's own
# noise): --seed is still taken, so scripts that pass it run, but not offered in their help.
UnusedSeedOption = Annotated[int, typer.Option("--seed", metavar="N", min=0, max=2**64 - 1, hidden=True,
    help="No effect: this command's output does not depend on a seed.")]
NoEmaOption = Annotated[bool, typer.Option("--no-ema", metavar="", help="Use the raw weights instead of the EMA.")]
OutOption = Annotated[Optional[str], typer.Option("--out", "-o", metavar="DIR",
    help="Output folder; default <run>/samples.")]
PictureOverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", metavar="", help="Replace the picture of an earlier identical call instead of refusing.")]
TensorboardOption = Annotated[bool, typer.Option("--tensorboard", metavar="",
                                                 help="Also add the images to the run's TensorBoard.")]


DataOption = Annotated[Optional[str], typer.Option("--data", metavar="DIR",
    help="Where the run's data is on this machine: its image folder or dataset root, or a prepared cache; "
         "default: where it was trained.")]


def _open(run, checkpoint, device: str, seed: int, no_ema: bool, data: str | None = None):
    import dataclasses

    import torch

    from glowtrain.checkpoint import open_run
    from glowtrain.data import relocated
    from glowtrain.distributed import make_current, resolve_device

    torch.manual_seed(seed)
    resolved = make_current(resolve_device(device, "--device"))
    loaded = open_run(run, checkpoint, resolved, use_ema=not no_ema)
    if data:
        here = relocated(loaded.cfg.data, data, loaded.run_dir)
        loaded = dataclasses.replace(loaded, cfg=dataclasses.replace(loaded.cfg, data=here))
    return loaded, resolved


# What a user may write as --out of a command that writes several files: `--out grid.png` made a folder of that name.
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg", ".pdf", ".csv", ".json",
                  ".txt")
_PICTURES = "the pictures (each named by its options)"


def _refuse_an_empty_out(out: str | None, default: str) -> None:
    if out is not None and not out.strip():  # an unset $OUT in a script: not the default place
        raise UserError(f"--out was given an empty path — pass a folder, or leave --out out for {default}")


def _refuse_a_file_name(out: str | None, writes: str, default: str = "<run>/samples") -> None:
    _refuse_an_empty_out(out, default)
    folder = out.endswith(("/", os.sep)) if out else False  # grid.png/ says it is a folder
    if out and not folder and Path(out).suffix.lower() in _FILE_SUFFIXES and not Path(out).is_dir():
        raise UserError(f"--out {out} names a file, but --out is the folder {writes} go into — pass a folder, like "
                        f"--out {shlex.quote(str(Path(out).with_suffix('')))}")


def _print_json(result: dict) -> None:
    from glowtrain.logs import strict_json

    if not_finite := [key for key, value in result.items() if isinstance(value, float) and not math.isfinite(value)]:
        typer.echo(f"warning: not finite, so printed as null: {', '.join(not_finite)} — the weights may have "
                   "diverged", err=True)
    typer.echo(json.dumps(strict_json(result), indent=2))


@app.command()
@process.errors_to_exit_codes
def sample(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    temp: Annotated[Optional[list[str]], typer.Option(
        "--temp", "-t", metavar="T[,T...]",
        help="Temperature(s): repeatable or comma-separated (--temp 0.5,0.7); default 0.7.")] = None,
    n: Annotated[int, typer.Option("--n", metavar="N", help="Images per temperature.")] = 64,
    class_: Annotated[Optional[list[str]], typer.Option(
        "--class", metavar="K[,K...]",
        help="Class for a class-conditional model, by number or name: repeated or comma-separated.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N",
        help="Images generated at once (bounds memory).")] = 256,
    grid: Annotated[bool, typer.Option(
        "--grid", metavar="", help="One figure, a labelled row block per temperature.")] = False,
    no_grid: Annotated[bool, typer.Option(
        "--no-grid", metavar="", help="No grid at all (with --individual); grids show at most 1,024 images.")] = False,
    individual: Annotated[bool, typer.Option(
        "--individual", metavar="", help="Also write each image as its own PNG, at the model's resolution.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar="", help="Replace files of an earlier identical call instead of refusing.")] = False,
    out: OutOption = None,
    device: DeviceOption = "auto",
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    tensorboard: TensorboardOption = False,
    progress: ProgressOption = True,
) -> None:
    """Sample PNG grids at one or more temperatures (0 gives the prior means)."""
    from glowtrain.distributed import make_current, resolve_device
    from glowtrain.sample import sample_command

    _refuse_a_file_name(out, _PICTURES)
    temperatures = _numbers(temp or ["0.7"], "--temp", "0.5,0.7")
    resolved = make_current(resolve_device(device, "--device"))
    paths = sample_command(run, checkpoint, temperatures, n, seed, out, resolved, not no_ema,
                           class_, batch_size, grid, individual, tensorboard, no_grid, overwrite,
                           say=lambda line: typer.echo(line, err=True), progress=progress)
    for path in paths:
        typer.echo(f"{path}/" if path.is_dir() else str(path))  # a folder of --individual images: once


def _numbers(values: list[str], option: str, example: str) -> list[float]:
    """Numbers given as a repeated option, a comma-separated list, or both."""
    if gap := next((value for value in values if re.search(r"[^,\s]\s*,[\s,]*,\s*[^,\s]", value)), None):
        raise UserError(f"{option} has an empty item in {gap!r} (a number left out?) — give values like {example}")
    parts = [part for value in values for part in value.split(",") if part.strip()]  # 0.7, and '' add nothing
    if not parts:
        raise UserError(f"{option} got no number ({' '.join(values)!r}); give at least one, like {example}")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise UserError(f"{option} takes numbers, repeated or comma-separated like {example}, "
                        f"got {' '.join(values)!r}") from None
    if bad := [number for number in numbers if not math.isfinite(number)]:
        raise UserError(f"{option} takes finite numbers, got {bad[0]} — give values like {example}")
    return numbers


@app.command("eval")
@process.errors_to_exit_codes
def eval_(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    split: Annotated[str, typer.Option("--split", metavar="test|train", help="test or train.")] = "test",
    n_dequant: Annotated[int, typer.Option("--n-dequant", metavar="S",
        help="Dequantisation draws to average over.")] = 1,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", metavar="N", help="Images per batch; default train.eval_batch_size.")] = None,
    device: DeviceOption = "auto",
    seed: UnusedSeedOption = 0,
    no_ema: NoEmaOption = False,
    data: DataOption = None,
    progress: ProgressOption = True,
) -> None:
    """Bits per dimension over a whole split, printed as JSON (with accuracy for class-conditional models)."""
    from glowtrain.analysis import eval_command

    loaded, resolved = _open(run, checkpoint, device, seed, no_ema, data)
    result = eval_command(loaded, split, n_dequant, resolved, batch_size, progress,
                          warn=lambda text: typer.echo(text, err=True))
    _print_json(result)


@app.command()
@process.errors_to_exit_codes
def reconstruct(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    n: Annotated[int, typer.Option("--n", metavar="N", help="Test images to encode and decode.")] = 16,
    out: OutOption = None,
    device: DeviceOption = "auto",
    seed: UnusedSeedOption = 0,
    no_ema: NoEmaOption = False,
    data: DataOption = None,
    tensorboard: TensorboardOption = False,
    overwrite: PictureOverwriteOption = False,
    progress: ProgressOption = True,
) -> None:
    """Encode and decode real test images: prints the error, writes originals above reconstructions."""
    from glowtrain.analysis import reconstruct_command

    _refuse_a_file_name(out, _PICTURES)
    loaded, resolved = _open(run, checkpoint, device, seed, no_ema, data)
    _print_json(reconstruct_command(loaded, n, resolved, out, tensorboard, not no_ema, overwrite, progress))


@app.command()
@process.errors_to_exit_codes
def interpolate(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    steps: Annotated[int, typer.Option("--steps", metavar="N", help="Images per path, the two ends included.")] = 8,
    pairs: Annotated[int, typer.Option("--pairs", metavar="N", help="Pairs of test images, one row each.")] = 4,
    out: OutOption = None,
    device: DeviceOption = "auto",
    seed: UnusedSeedOption = 0,
    no_ema: NoEmaOption = False,
    data: DataOption = None,
    tensorboard: TensorboardOption = False,
    overwrite: PictureOverwriteOption = False,
    progress: ProgressOption = True,
) -> None:
    """Walk in latent space (all levels) between pairs of test images; writes a grid."""
    from glowtrain.analysis import interpolate_command

    _refuse_a_file_name(out, _PICTURES)
    loaded, resolved = _open(run, checkpoint, device, seed, no_ema, data)
    typer.echo(str(interpolate_command(loaded, pairs, steps, resolved, out, tensorboard, not no_ema, overwrite,
                                       progress)))


@app.command()
@process.errors_to_exit_codes
def manipulate(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    attribute: Annotated[Optional[str], typer.Option("--attribute", metavar="NAME",
        help="CelebA attribute, e.g. Smiling.")] = None,
    from_class: Annotated[Optional[str], typer.Option("--from-class", metavar="K",
        help="Class to move away from, by number or name.")] = None,
    to_class: Annotated[Optional[str], typer.Option("--to-class", metavar="K",
        help="Class to move towards, by number or name.")] = None,
    alphas: Annotated[Optional[list[str]], typer.Option(
        "--alphas", metavar="A[,A...]",
        help="Step sizes along the direction: comma-separated or repeated; default -1,0,1,2.")] = None,
    n: Annotated[int, typer.Option("--n", metavar="N", help="Test images to manipulate, one row each.")] = 8,
    out: OutOption = None,
    device: DeviceOption = "auto",
    seed: UnusedSeedOption = 0,
    no_ema: NoEmaOption = False,
    data: DataOption = None,
    tensorboard: TensorboardOption = False,
    overwrite: PictureOverwriteOption = False,
    progress: ProgressOption = True,
) -> None:
    """Move test images along an attribute or class direction in latent space (the Glow paper's Fig. 5)."""
    from glowtrain.analysis import manipulate_command

    _refuse_a_file_name(out, _PICTURES)
    alpha_values = _numbers(alphas or ["-1,0,1,2"], "--alphas", "-1,0,1,2")
    loaded, resolved = _open(run, checkpoint, device, seed, no_ema, data)
    _print_json(manipulate_command(loaded, resolved, out, alpha_values, n, attribute, from_class, to_class,
                                   tensorboard=tensorboard, use_ema=not no_ema, overwrite=overwrite,
                                   progress=progress))


@app.command()
@process.errors_to_exit_codes
def score(
    run: RunOption = None,
    checkpoint: CheckpointOption = None,
    images: Annotated[Optional[list[str]], typer.Option(
        "--images", metavar="PATH", help="Image files or folders to score (repeatable).")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", metavar="NAME",
            help="A built-in set instead of files: digits, mnist, fashion_mnist, cifar10, celeba; or folder, a "
                 "folder run's own split as it trained on it.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", metavar="test|train",
        help="The --dataset split: test (the default) or train.")] = None,
    against: Annotated[Optional[list[str]], typer.Option(
        "--against", metavar="PATH",
            help="A second set of files or folders, treated as out-of-distribution (repeatable).")] = None,
    reference_run: Annotated[Optional[str], typer.Option(
        "--reference-run", metavar="PATH", help="A second run (or checkpoint) for the likelihood-ratio score.")] = None,
    n_dequant: Annotated[int, typer.Option("--n-dequant", metavar="S",
        help="Dequantisation draws to average over (with one, an image's score moves a little with its place "
             "among those scored; 16 or more steady it).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N",
        help="Images scored at once (bounds memory).")] = 256,
    batch_test: Annotated[bool, typer.Option(
        "--batch-test", metavar="", help="Typicality test of each set as a whole, with a bootstrap p-value.")] = False,
    n_bootstrap: Annotated[int, typer.Option("--n-bootstrap", metavar="N",
        help="Bootstrap draws for --batch-test.")] = 10_000,
    on_bad_image: Annotated[str, typer.Option(
        "--on-bad-image", metavar="skip|error",
            help="skip or error for unreadable files; default: the run's data.on_bad_image.")] = "",
    out: Annotated[Optional[str], typer.Option("--out", "-o", metavar="DIR",
        help="Output folder; default <run>/score.")] = None,
    device: DeviceOption = "auto",
    no_ema: NoEmaOption = False,
    data: DataOption = None,
    progress: ProgressOption = True,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar="", help="Replace an earlier score in the output folder instead of refusing.")] = False,
) -> None:
    """Per-image bits/dim and out-of-distribution scores: a CSV, a JSON summary, histograms; AUROC with --against."""
    from glowtrain.score import ScoreOptions, report, score_command

    options = ScoreOptions(n_dequant, batch_size, batch_test, n_bootstrap, on_bad_image=on_bad_image,
                           progress=progress, overwrite=overwrite)
    options.check()
    _refuse_a_file_name(out, "scores.csv, summary.json and the histograms", "<run>/score")
    loaded, _ = _open(run, checkpoint, device, 0, no_ema, data)
    reference = None
    if reference_run:  # a run directory or, like glowtrain.load_run, a checkpoint file
        as_file = Path(reference_run).is_file()
        try:
            reference = _open(None if as_file else reference_run, reference_run if as_file else None, device, 0,
                              no_ema)[0]
        except UserError as e:
            raise UserError(f"--reference-run: {e}") from None
    summary = score_command(loaded, images or [], dataset, split, against or [], reference, out, options, not no_ema)
    lines, warnings = report(summary)
    for line in warnings:
        typer.echo(line, err=True)
    typer.echo("\n".join(lines))


@app.command()
@process.errors_to_exit_codes
def info(
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", metavar="PATH", help="YAML config; default: bundled digits.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
        help="Override a key (repeatable).")] = None,
    run: Annotated[Optional[str], typer.Option("--run", metavar="DIR",
        help="Describe a trained run instead of a config.")] = None,
) -> None:
    """Parameters per level, latent shapes, dimensionality, multiply-adds per image and the resolved config."""
    from glowtrain.analysis import info_summary
    from glowtrain.config import load_config
    from glowtrain.sample import class_names

    if run and config:
        raise UserError("give either --run or --config, not both")
    if run and set_:
        # A trained run is described as it was trained; an override would describe another model.
        raise UserError(f"--set does not apply to --run (the run is described as trained); for a changed config "
                        f"use: glowtrain info --config {shlex.quote(str(Path(run) / 'config.yaml'))} --set ...")
    if run and Path(run).is_file():  # info has no --checkpoint to offer, as the other commands' message does
        from glowtrain.runs import run_file_fix

        raise UserError(f"--run takes a run directory, and {run} is a file — "
                        f"{run_file_fix(Path(run), checkpoint_option=False)}")
    if run:
        from glowtrain.runs import training_state

        loaded, _ = _open(run, None, "cpu", 0, True)
        cfg, run_dir = loaded.cfg, loaded.run_dir
        summary = {**training_state(run, loaded.step, cfg.train.steps),
                   **info_summary(cfg, loaded.model, loaded.objective.dequantizer)}
    else:
        from glowtrain.config import check_new_run
        from glowtrain.data import n_classes
        from glowtrain.run_data import check_class_count

        cfg, run_dir = load_config(config, set_ or []), None
        check_new_run(cfg)  # what fit refuses, info does not describe
        found = n_classes(cfg.data)  # known without the data for every dataset but a folder labelled by subfolders
        if found is not None and not cfg.data.cache:
            check_class_count(cfg, found)
        summary = info_summary(cfg)
    if cfg.model.n_classes and (names := class_names(run_dir, cfg.data)):
        summary["class_names"] = names  # what --class cats means, in label order
    config_text = summary.pop("config")
    for key, value in summary.items():
        typer.echo(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    typer.echo("config:")
    typer.echo("  " + config_text.replace("\n", "\n  ").rstrip())


@app.command()
@process.errors_to_exit_codes
def prepare(
    config: Annotated[Optional[str], typer.Option(
        "--config", "-c", metavar="PATH", help="YAML config whose data section to cache.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
        help="Override a key (repeatable).")] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", metavar="DIR",
            help="Cache directory to write; default <data.root>/glowtrain-cache-<dataset>-<size>px, "
                            "inside the image folder.")] = None,
    progress: ProgressOption = True,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a cache at --out prepared with other settings (runs may train from it).")
    ] = False,
) -> None:
    """Decode a dataset once into a uint8 cache at the training resolution; train from it with data.cache."""
    from glowtrain.cache import prepare_cache, replaced_note
    from glowtrain.config import default_config, load_config
    from glowtrain.folders import prepared_index

    _refuse_an_empty_out(out, "<data.root>/glowtrain-cache-<dataset>-<size>px")
    cfg = load_config(config, set_ or [])
    if cfg.data.cache:
        raise UserError("data.cache is set: prepare reads the images themselves — remove data.cache for this command")
    target = out or f"{cfg.data.root}/glowtrain-cache-{cfg.data.dataset}-{cfg.data.image_size}px"
    target = os.path.abspath(os.path.expanduser(target))  # said below as a path that works from anywhere
    before = prepared_index(target)
    index = prepare_cache(cfg.data, target, progress=progress, overwrite=overwrite)
    typer.echo(index["summary"])
    for said in (index["warning"], replaced_note(target, before, index)):
        if said:
            typer.echo(said, err=True)
    typer.echo(f"cached {index['splits']['train']:,} train and {index['splits']['test']:,} test images in {target}")
    # With the keys that decide the cache's images where they are not the defaults: fit refuses the cache otherwise.
    defaults = default_config().data
    keys = [f"data.{name}={value}" for name, value in index.get("keys", {}).items() if value != getattr(defaults, name)]
    settings = [f"data.cache={target}", *keys]
    if index.get("class_names"):  # class folders: fit refuses them without as many classes in the model
        settings.append(f"model.n_classes={index['n_classes']}")
    typer.echo("train from it with: " + " ".join(f"--set {shlex.quote(each)}" for each in settings))


@app.command("runs")
@process.errors_to_exit_codes
def runs_(
    root: Annotated[str, typer.Option("--root", metavar="DIR", help="Folder holding the runs.")] = "runs",
) -> None:
    """List the runs under runs/: step reached, best test bits/dim and status."""
    from glowtrain.runs import RUN_SEARCH_DEPTH, RunDir, format_runs, list_runs

    if (root != "runs" or Path(root).exists()) and not Path(root).is_dir():  # runs/ is not there before a first run
        what = "a file, not a folder" if Path(root).exists() else "no such folder"
        raise UserError(f"--root {root}: {what} — pass the folder that holds your runs (default: runs)")
    unsearched: list[Path] = []
    rows = list_runs(Path(root), unsearched)
    if unsearched:  # said first, so that it is not lost above a long table
        first = unsearched[0]
        holding = f"{first} and {len(unsearched) - 1} more hold" if len(unsearched) > 1 else f"{first} holds"
        typer.echo(f"note: folders more than {RUN_SEARCH_DEPTH} levels below {root} are not searched, and {holding} "
                   f"some — list the runs there with --root {shlex.quote(str(first))}", err=True)
    if not rows and RunDir(Path(root)).config.is_file():  # a run itself: it holds no runs, but is not "no runs"
        raise UserError(f"--root {root} is a run directory, not a folder of runs — pass the folder that holds it "
                        f"(--root {shlex.quote(str(Path(root).parent))}), or see this run with: glowtrain info --run "
                        f"{shlex.quote(root)}")
    if not rows:
        typer.echo(f"no runs under {Path(root).absolute()}/ — train one with 'glowtrain fit'")
        return
    for line in format_runs(rows):
        typer.echo(line)



try:
    from typer.exceptions import TyperException as _ParseError  # typer that carries its own copy of click
except ImportError:  # older typer, built on click itself
    from click import ClickException as _ParseError


def main() -> None:
    """The `glowtrain` command: typer's own usage errors (an unknown option, a value of the wrong type) end in one
    line and exit 2 like ours, instead of a usage banner and a boxed message."""
    outlives = process.OutputThatOutlivesItsReader
    sys.stdout, sys.stderr = outlives(sys.stdout), outlives(sys.stderr)
    process.state["whole_process"], process.state["ended"] = True, False
    process.interrupt_on_stop_signals()
    warnings.showwarning = process.one_line_warning
    try:
        code = app(prog_name="glowtrain", standalone_mode=False)
    except _ParseError as error:
        sys.exit(process.usage_error(error))
    except typer.Abort:
        process.exit_saying(process.EXIT_FAILURE, "aborted")
    finally:
        process.default_stop_signals()
    if code == process.EXIT_INTERRUPTED and not process.state["ended"]:  # typer's own, silent word for a Ctrl-C
        process.exit_saying(process.EXIT_INTERRUPTED, "interrupted")  # before a command took over (torch importing)
    sys.exit(code if isinstance(code, int) else 0)
