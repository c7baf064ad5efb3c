"""Run configuration: typed dataclasses mirroring the YAML sections, load/save, dotted overrides, validation.

A config file has four sections (run, data, model, train); every key has a default, so a file
only lists what it changes. `--set section.key=value` overrides are parsed as YAML like file values,
whose unquoted values are read as the type of their key (PlainText). The one-line meaning of each key
lives in its field's metadata and feeds the shipped YAML comments, `describe_keys()` and the README.
"""

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from glowtrain.errors import UserError
from glowtrain.files import atomic_write

Dataset = Literal["digits", "mnist", "fashion_mnist", "cifar10", "celeba", "folder"]

# Datasets whose images have a fixed number of channels; celeba and folder may be read as 1 or 3.
FIXED_CHANNELS = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}
CHANNEL_CHOICES = (1, 3)  # greyscale or RGB
SPLINE_BOUND_LIMIT = 50  # a new run's largest model.spline_bound: ActNorm keeps the flow's values of order 1
GRID_LIMIT = 1024  # images per sample grid: a 1,024-image grid of 64x64 images is about 2,100 pixels a side


def _opt(default: Any, help: str) -> Any:
    """A dataclass field whose one-line meaning travels with it (the single source of key docs)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Frozen: the rest of the code reads a config but never changes it; use dataclasses.replace.
@dataclass(frozen=True)
class RunConfig:
    name: str = _opt("digits", "run directory name under runs/")
    seed: int = _opt(0, "seeds everything: init, data order, dequantisation noise (0 to 2**32 - 1)")
    device: str = _opt("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    tf32: bool = _opt(True, "CUDA: TF32 tensor cores for the coupling networks in training (never for 1x1 convs or "
                      "evaluation)")
    deterministic: bool = _opt(False, "deterministic kernels, no cuDNN autotuning: bit-exact resume on CUDA (slower)")
    threads: int = _opt(0, "CPU threads per training process (0 = torch's choice: one per core, or one under "
                        "--nproc/torchrun; 1 keeps pace beside other busy programs)")


@dataclass(frozen=True)
class DataConfig:
    dataset: Dataset = _opt("digits", "which images to model")
    root: str = _opt("data", "where datasets live (ignored for digits)")
    image_size: int = _opt(8, "training resolution in pixels (square)")
    channels: int = _opt(1, "1 greyscale or 3 RGB (folder/celeba); others fixed by the dataset")
    n_bits: int = _opt(4, "bits per colour channel kept (1..8)")
    download: bool = _opt(False, "torchvision sets: download when missing")
    hflip: bool = _opt(False, "random horizontal flips in training")
    test_fraction: float = _opt(0.1, "folder/celeba-folder: share held out for test (0 < f < 1)")
    split_seed: int = _opt(0, "fixes the folder train/test split")
    n_workers: int = _opt(0, "DataLoader worker processes per training process (0 = load in the main process; at "
                             "most its share of the CPUs)")
    on_bad_image: Literal["skip", "error"] = _opt("error", "an unreadable image in a folder: stop before training, "
                                                  "or skip (drop and count) it")
    labels: Literal["none", "subfolders"] = _opt("none", "folder: class labels from each image's first-level "
                                                 "subfolder (for model.n_classes)")
    cache: str = _opt("", "folder made by 'glowtrain prepare' to train from ('' = decode images)")

    @property
    def n_bins(self) -> int:
        """Number of intensity levels per channel after dropping low bits."""
        return 2**self.n_bits

    @property
    def reads_image_files(self) -> bool:
        """folder and celeba read the image files under data.root (the others are fixed sets of their own)."""
        return self.dataset in ("folder", "celeba")


# The coupling kinds of the flow and of the variational dequantiser's noise flow (one list: both build them from
# glowtrain.flows.COUPLING_KINDS).
CouplingKind = Literal["spline", "affine", "additive"]


@dataclass(frozen=True)
class ModelConfig:
    n_levels: int = _opt(2, "L: levels, each a squeeze, K steps and a split")
    n_steps: int = _opt(8, "K: flow steps per level")
    hidden_channels: int = _opt(64, "width of the coupling networks")
    # The names registered in glowtrain.flows.COUPLING_KINDS and CONV_KINDS, repeated because config
    # imports no torch; tests/test_flows.py checks that they agree.
    coupling: CouplingKind = _opt("spline", "coupling layer type")
    spline_bins: int = _opt(8, "spline coupling: K rational-quadratic bins per element")
    spline_bound: float = _opt(3.0, "spline coupling: bins cover [-B, B]; identity outside")
    conv: Literal["lu", "plain", "shuffle", "reverse"] = _opt(
        "lu", "channel mixing between couplings (1x1 conv or permutation)"
    )
    learn_top: bool = _opt(True, "learn the mean and scale of the top-level prior")
    n_classes: int = _opt(0, ">0: class-conditional prior + classifier head")
    dequantization: Literal["uniform", "variational"] = _opt(
        "variational", "uniform noise, or a learned noise flow q(u|x) (Flow++)")
    dequant_steps: int = _opt(4, "variational: couplings in the noise flow")
    dequant_hidden_channels: int = _opt(32, "variational: width of the noise flow's networks")
    dequant_coupling: CouplingKind = _opt("spline", "variational: the noise flow's "
                                                                     "coupling type (spline starts as uniform noise)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _opt(427, "total optimiser steps")
    batch_size: int = _opt(64, "images per forward pass and process")
    grad_accum_steps: int = _opt(1, "forward passes per optimiser step: the step's batch is batch_size x this x "
                                 "processes")
    init_batch_size: int = _opt(256, "batch for the ActNorm data-dependent init")
    eval_batch_size: int = _opt(256, "batch for test-set evaluation")
    optimizer: Literal["adamax", "adam"] = _opt("adamax", "optimiser: adamax (as openai/glow), or adam (fused: "
                                                "skips bad steps without a per-step GPU sync)")
    lr: float = _opt(3e-2, "peak learning rate")
    weight_decay: float = _opt(0.0, "decoupled weight decay (0 = off)")
    warmup_steps: int = _opt(100, "linear learning-rate warm-up from 0")
    lr_schedule: Literal["constant", "cosine"] = _opt("constant", "learning rate after warm-up")
    min_lr_ratio: float = _opt(0.0, "cosine floor as a fraction of lr")
    grad_clip: float = _opt(50.0, "max global gradient norm (0 = off)")
    ema_decay: float = _opt(0.998, "Polyak averaging of weights (0 = off); decay warmed up")
    class_weight: float = _opt(0.01, "classification loss weight when n_classes > 0")
    log_every: int = _opt(50, "steps between training-loss log lines")
    eval_every: int = _opt(250, "steps between test-set evaluations")
    sample_every: int = _opt(500, "steps between sample grids")
    checkpoint_every: int = _opt(250, "steps between checkpoints")
    sample_temperatures: list[float] = _opt([0.7, 1.0], "prior temperatures for sample grids")
    n_samples: int = _opt(64, "images per sample grid (at most 1,024)")
    max_bad_steps: int = _opt(10, "consecutive non-finite steps (skipped) before rolling back to last.pt with half "
                              "the lr (checked when logging); twice stops the run")
    amp: Literal["off", "bf16", "fp16"] = _opt("off", "coupling networks in bfloat16 (CUDA cc >= 8.0, or CPU) or "
                                               "float16 with a gradient scaler (CUDA); log-dets, priors, loss stay "
                                               "float32")
    allow_emulated_bf16: bool = _opt(False, "accept amp=bf16 on a GPU without native bf16 (compute capability < 8.0), "
                                     "where it is slow")
    compile: Literal["auto", "on", "off"] = _opt("auto", "torch.compile the training forward and backward; auto: on "
                                                 "for CUDA when a compiler backend works, off elsewhere")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = _opt(
        "default", "torch.compile mode: reduce-overhead adds CUDA graphs; max-autotune also searches kernels")
    compile_scope: Literal["model", "steps"] = _opt(
        "model", "what compiles: model (one graph, first step minutes for deep models) or steps (each flow "
        "step, compiled once per level and reused: a much shorter first step)")
    memory_saving: bool = _opt(False, "constant-memory backprop: rebuild activations by inverting each flow step "
                               "(~1.3x step time)")
    max_time: str = _opt("", "stop cleanly (checkpoint saved) after this wall-clock time, e.g. 3h50m, 90m, 45s, "
                         "3:50:00 ('' = no limit)")

    @property
    def max_time_s(self) -> float | None:
        """train.max_time in seconds (None: no limit)."""
        return duration_seconds(self.max_time)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        return (self.data.channels, self.data.image_size, self.data.image_size)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
_FIELDS: dict[str, dataclasses.Field] = {
    f"{sec}.{f.name}": f for sec, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what run.device and --device accept
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+(_\d+)*|0x[0-9a-fA-F]+|0o[0-7]+|0b[01]+")  # leading zeros are decimal: 010 is 10
_NOT_FINITE = re.compile(r"[+-]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)")


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
_CLOCK = re.compile(r"(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)")  # H:MM:SS, as a scheduler's time limit is written


def duration_seconds(text: str) -> float | None:
    """'3h50m', '90m', '45s', '1.5h', '3:50:00' -> seconds; '' -> None. Raises UserError for anything else."""
    text = text.strip()
    if not text:
        return None
    if _NUMBER.fullmatch(text):
        raise UserError(f"train.max_time={text!r} is a number without a unit — write {text}s, or hours and "
                        "minutes like 1h30m")
    if clock := _CLOCK.fullmatch(text):
        return sum(float(part) * scale for part, scale in zip(clock.groups(), (3600, 60, 1)))
    match = _DURATION.fullmatch(text)
    if not match or not any(match.groups()):
        minutes_or_hours = " (hours:minutes or minutes:seconds? write 1h30m or 1m30s)" if text.count(":") == 1 else ""
        raise UserError(f"train.max_time={text!r} is not a duration{minutes_or_hours} — use hours, minutes and "
                        "seconds like 3h50m, 90m, 45s or 3:50:00 ('' = no limit)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def default_config() -> Config:
    """The embedded default: a small Glow with spline couplings and learned dequantisation on the bundled digits."""
    return Config()


def derived_seed(seed: int, index: int) -> int:
    """The seed of the index-th independent stream (an epoch, a step, an image) of run.seed."""
    return (seed * 1_000_003 + index) % 2**64  # torch takes seeds below 2**64; smaller ones are unchanged


# Seeds run from 0 to 2**32 - 1: torch's CPU generator reads only a seed's low 32 bits, so 2**32 would draw
# what 0 draws (CUDA's reads 64). Streams derived from a seed may be larger; on the CPU they stay distinct, as
# seed * 1_000_003 (odd) is a different number modulo 2**32 for every seed.
SEED_LIMIT = 2**32


def check_new_run(cfg: Config) -> None:
    """What only a new run is held to (a run trained before these checks still loads and resumes as it was): a
    run.seed that torch's CPU generator tells apart from every other, a spline bound near the flow's values."""
    if cfg.run.seed >= SEED_LIMIT:
        raise UserError(f"run.seed={cfg.run.seed} is not allowed — use an integer from 0 to 2**32 - 1 (torch's CPU "
                        "generator reads 32 bits: a larger seed repeats a smaller one's draws)")
    if "model.spline_bound" not in unused_model_keys(cfg.model):
        _require(cfg.model.spline_bound <= SPLINE_BOUND_LIMIT, "model.spline_bound", cfg.model.spline_bound,
                 f"use a bound up to {SPLINE_BOUND_LIMIT} (the flow's values are of order 1: wider bins train badly "
                 "or to non-finite losses; the default 3 covers them)")


def dotted_keys() -> list[str]:
    """Every valid `section.key`, in file order."""
    return list(_FIELDS)


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if get_origin(f.type) is Literal:
        text += ": " + ", ".join(get_args(f.type))
    return text


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default repr, one-line meaning) for every key: README's key table and configs/*.yaml comments
    (scripts/refresh_config_docs.py)."""
    return [(key, repr(_default(f)), _help(f)) for key, f in _FIELDS.items()]


# ---------------------------------------------------------------------------- type checking


# Names other trainers (openai/glow's flags among them) give to our keys.
_OTHER_NAMES = {"learning_rate": "train.lr", "epochs": "train.steps", "n_epochs": "train.steps",
                "iterations": "train.steps", "num_workers": "data.n_workers", "n_bits_x": "data.n_bits",
                "depth": "model.n_steps", "width": "model.hidden_channels", "flow_coupling": "model.coupling",
                "flow_permutation": "model.conv", "n_batch_train": "train.batch_size", "n_batch_test":
                "train.eval_batch_size", "n_batch_init": "train.init_batch_size", "n_y": "model.n_classes",
                "num_classes": "model.n_classes", "polyak_epochs": "train.ema_decay", "problem": "data.dataset"}


def _keys_named(name: str) -> list[str]:
    """The dotted keys whose own name (after the section) is `name`."""
    return [key for key in dotted_keys() if key.rsplit(".", 1)[-1] == name]


def _unknown_key(key: str, source: str) -> UserError:
    """An unknown-key error with the nearest valid key, if any is close."""
    keys = dotted_keys()
    leaf = key.rsplit(".", 1)[-1]
    # A right name in the wrong section (or missing its section) is the likeliest slip; then another trainer's.
    same_leaf = _keys_named(leaf)
    if not same_leaf and leaf in _OTHER_NAMES:
        same_leaf = [_OTHER_NAMES[leaf]]
    close = same_leaf or difflib.get_close_matches(key, keys + list(_SECTIONS), n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    if key in keys:  # a dotted key written as one name in a file: YAML wants it nested
        section, name = key.split(".")
        hint = f" — in a YAML file write it nested: '{section}:' and on the next line, indented, '{name}: ...'"
    return UserError(f"unknown key '{key}' in {source}{hint}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):  # bool is an int subclass; true/false is never meant as a number
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _type_name(tp: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "a list of numbers")


def _as_typed(value: Any) -> str:
    """`value` as it is written after `--set key=`: YAML, a list without spaces so the shell keeps it one word."""
    if isinstance(value, list):
        return "[" + ",".join(_as_typed(v) for v in value) + "]"
    return _yaml_value(value)


_NO_VALUE = object()  # `current` not given: the key's value before the override is not known


def _example(key: str, current: Any = _NO_VALUE) -> str:
    """`key=VALUE (whose)`: the value the config had (an override's), else the default."""
    default = _default(_FIELDS[key])
    own = current is not _NO_VALUE and current != default
    example, whose = (current, "the config's") if own else (default, "the default")
    return f"{key}={_as_typed(example)} ({whose})"


def _type_error(key: str, value: Any, tp: Any, expected: str = "", current: Any = _NO_VALUE) -> UserError:
    """A wrong-type error that ends with the fix."""
    return UserError(f"{key}: expected {expected or _type_name(tp)}, got {value!r} — use a value like "
                     f"{_example(key, current)}")


def _choice_error(key: str, value: Any, choices: tuple, current: Any = _NO_VALUE) -> UserError:
    """A value that is none of the key's words: the word it is closest to, else an example."""
    # YAML 1.1 reads off/on/yes/no as booleans, so `amp: off` arrives as False.
    hint = " (YAML reads off/on/yes/no as true/false — quote the word)" if isinstance(value, bool) else ""
    close = difflib.get_close_matches(str(value).lower(), choices, n=1)
    fix = f"{key}={close[0]}" if close else f"one of them, e.g. {_example(key, current)}"
    return UserError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint} — use {fix}")


class PlainText(str):
    """An unquoted YAML value, read as the type of the key it is given to. YAML 1.1 (PyYAML's) decides alone: it
    read `seed: 010` as 8 (octal), `steps: 1:30` as 90 (base 60), `name: 001` as 1 and `name: 2024-01-05` as a
    date, and `lr: 1e-3` (no dot) as text."""

    def __repr__(self) -> str:  # in messages: a number as written (`got 20.0`), other text quoted (`got '1:30'`)
        return str(self) if _NUMBER.fullmatch(self) else repr(str(self))


def _read_plain(value: Any, tp: Any) -> Any:
    """`value` with its unquoted text read for a key of type `tp`; what it cannot be is left for _coerce to refuse."""
    if get_origin(tp) is list:  # numbers, or a lone number read as one
        return [_read_plain(item, float) for item in value] if isinstance(value, list) else _read_plain(value, float)
    if not isinstance(value, PlainText):
        return value
    if tp is str or get_origin(tp) is Literal and value in get_args(tp):
        return str(value)
    if tp is int and _INTEGER.fullmatch(value):
        return int(value.replace("_", ""), 0 if value[:2] in ("0x", "0o", "0b") else 10)
    if tp is float and _NUMBER.fullmatch(value.replace("_", "")):
        return float(value.replace("_", ""))
    if tp is float and _NOT_FINITE.fullmatch(value):  # YAML's .inf and .nan: refused as not finite
        return float(value.replace(".", ""))
    if value.lower() in ("true", "false", "yes", "no", "on", "off"):  # YAML 1.1's words for true and false
        return value.lower() in ("true", "yes", "on")
    return value


def _coerce(key: str, value: Any, tp: Any, current: Any = _NO_VALUE) -> Any:
    """Check `value` against the field type `tp`; return it converted (int -> float, number -> str)."""
    value = _read_plain(value, tp)
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        # YAML 1.1 reads on/off as booleans: `compile: on`, `amp: off` mean the words where the key has them.
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"
        raise _choice_error(key, value, choices, current)
    result: Any = None
    if tp is bool:
        result = value if isinstance(value, bool) else None
    elif tp is int:
        # 16.0 is refused too, not truncated, so a float given for a count always fails loudly.
        result = value if isinstance(value, int) and not isinstance(value, bool) else None
    elif tp is float:
        result = _as_float(value)
    elif tp is str:
        if isinstance(value, str):
            result = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            result = str(value)  # `name: 123` means the name "123"
    elif get_origin(tp) is list:
        # A lone number is a one-element list: `sample_temperatures: 0.7` means [0.7].
        items = [_as_float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        result = None if any(v is None for v in items) else items
    if result is None:
        quoted = isinstance(value, str) and not isinstance(value, PlainText)  # '5': the quotes are the slip
        whole = _as_float(value) if tp is int and not quoted else None
        if whole is not None and math.isfinite(whole) and whole.is_integer():
            raise UserError(f"{key}: expected an integer, got {value!r} — write it without a decimal point or "
                            f"exponent: {key}={int(whole)}")
        raise _type_error(key, value, tp, current=current)
    if any(isinstance(v, float) and not math.isfinite(v) for v in (result if isinstance(result, list) else [result])):
        raise _type_error(key, value, tp, "finite numbers" if isinstance(result, list) else "a finite number", current)
    return result


def _what(value: Any) -> str:
    """A YAML value as an error names it: the text itself, or what kind of thing it is."""
    if isinstance(value, str):  # PlainText too: `train: 5` reads as the text 5
        return repr(str(value))
    return "a list" if isinstance(value, list) else type(value).__name__


def _build(d: Any, source: str) -> Config:
    """Config from nested mappings, type-checked but not yet range-checked."""
    if not isinstance(d, Mapping):
        raise UserError(f"{source} must be a mapping of sections (run, data, model, train), got {_what(d)}")
    sections = {}
    for sec, body in d.items():
        if sec not in _SECTIONS:
            raise _unknown_key(str(sec), source)
        body = {} if body is None else body  # a section with every key commented out
        if not isinstance(body, Mapping):
            raise UserError(f"section '{sec}' in {source} must be a mapping of key: value, got {_what(body)}")
        values = {}
        for k, v in body.items():
            key = f"{sec}.{k}"
            if key not in _FIELDS:
                raise _unknown_key(key, source)
            values[k] = _coerce(key, v, _FIELDS[key].type)
        sections[sec] = _SECTIONS[sec](**values)
    return Config(**sections)


def config_from_dict(d: dict, source: str = "config") -> Config:
    """Validated Config from `{section: {key: value}}`; missing keys keep their defaults."""
    cfg = _build(d, source)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """`{section: {key: value}}` of plain Python types (a deep copy)."""
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- overrides


def _parse_override(text: str) -> tuple[str, Any, str]:
    """`section.key=VALUE` -> (key, YAML-parsed value, raw value text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    sec, dot, leaf = key.partition(".")
    if not sep or not dot or not sec or not leaf:
        whole = _keys_named(key) if sep and not dot else []
        example = f"--set {whole[0]}={raw.strip()}" if len(whole) == 1 else "--set train.lr=5e-4"
        raise UserError(f"malformed override '{text}' — use the form --set section.key=value, e.g. {example}")
    try:
        value = yaml.load(raw, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise UserError(f"--set {text}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return key, value, raw.strip()


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated Config with each `section.key=VALUE` applied in order (later wins)."""
    cfg = _apply(cfg, overrides)
    validate(cfg)
    _check_for_training(cfg)
    return cfg


def _apply(cfg: Config, overrides: Sequence[str]) -> Config:
    if isinstance(overrides, str):  # a lone string would otherwise be applied character by character
        overrides = [overrides]
    changes: dict[str, dict[str, Any]] = {}
    for text in overrides:
        key, value, raw = _parse_override(text)
        if key not in _FIELDS:
            raise _unknown_key(key, f"--set {text}")
        tp = _FIELDS[key].type
        if tp is str and (not isinstance(value, str) or isinstance(value, PlainText)):
            value = raw  # `data.cache=`, `run.name=exp #3` or `=[ablation]` mean that text: not null, a comment, a list
        sec, leaf = key.split(".")
        changes.setdefault(sec, {})[leaf] = _coerce(key, value, tp, getattr(getattr(cfg, sec), leaf))
    parts = {sec: dataclasses.replace(getattr(cfg, sec), **kv) for sec, kv in changes.items()}
    return dataclasses.replace(cfg, **parts)


# ---------------------------------------------------------------------------- resuming

# What a resumed run may change besides run.* and train.*: where the files are and how they are read.
# Every other data.* and model.* key changes what is modelled (or the architecture), so a run's
# metrics and best checkpoint would mix two models.
# on_bad_image only says whether unreadable files are dropped: a resume that drops one is like one whose folder
# lost a file, which a resume allows (and warns of: the run's numbers are not comparable across it).
RESUME_SAFE_DATA_KEYS = ("data.root", "data.cache", "data.download", "data.n_workers", "data.on_bad_image")


def with_absolute_data_paths(cfg: Config) -> Config:
    """data.root and data.cache as absolute paths (~ expanded): a run's stored config then finds its data from
    any working directory (eval, score and the other commands read it from the checkpoint)."""
    def absolute(path: str) -> str:
        if not path:
            return path
        given = Path(path).expanduser().absolute()
        # '..' taken out, so config.yaml and messages name the folder itself, unless a link before it makes
        # the shorter path another folder (the system follows the link first).
        tidy = os.path.normpath(given)
        elsewhere = given.exists() and not (os.path.exists(tidy) and os.path.samefile(given, tidy))
        return str(given) if elsewhere else tidy
    bundled = cfg.data.dataset == "digits"  # no files under data.root to find (a prepared cache may still be used)
    data = dataclasses.replace(cfg.data, root=cfg.data.root if bundled else absolute(cfg.data.root),
                               cache=absolute(cfg.data.cache))
    return dataclasses.replace(cfg, data=data)


def resume_may_change(key: str) -> bool:
    """Whether `key` may differ between a run's stored config and the config it resumes with."""
    return key.split(".")[0] in ("run", "train") or key in RESUME_SAFE_DATA_KEYS


def unused_model_keys(model: ModelConfig) -> set[str]:
    """The model.* keys that build nothing in this model: the noise flow's without variational dequantisation, the
    splines' without a spline coupling."""
    unused = set()
    if model.dequantization != "variational":
        unused |= {"model.dequant_steps", "model.dequant_hidden_channels", "model.dequant_coupling"}
    if "spline" not in (model.coupling, model.dequant_coupling if model.dequantization == "variational" else ""):
        unused |= {"model.spline_bins", "model.spline_bound"}
    return unused


def fixed_on_resume(key: str, *models: ModelConfig) -> bool:
    """Whether a resume refuses a change of `key`: it changes what is modelled, unless none of `models` (the run's
    and the resume's) builds anything from it."""
    return not resume_may_change(key) and not all(key in unused_model_keys(model) for model in models)


def check_resume_config(saved: Config, new: Config) -> None:
    """Refuse a resume whose config changes what is modelled: one line naming the first such key. A key the model
    does not use (before or after) may change, as it changes nothing."""
    before, after = config_to_dict(saved), config_to_dict(new)
    for key in dotted_keys():
        sec, leaf = key.split(".")
        if before[sec][leaf] != after[sec][leaf] and fixed_on_resume(key, saved.model, new.model):
            raise UserError(f"{key} cannot change when resuming (the run was trained with "
                            f"{_yaml_value(before[sec][leaf])}, not {_yaml_value(after[sec][leaf])}): it changes the "
                            "model or what it models — start a new run with another --out or run.name")


def settings_changed_on_resume(trained: Mapping, new: Config) -> list[str]:
    """`key=value (the run had value)` for each run.* and train.* setting a resume trains with other than the run
    did (train.steps aside: the resume line says it). A `--config` given on resume sets every key it holds,
    also ones the run had set otherwise with --set."""
    after = config_to_dict(new)
    before = config_to_dict(_build(trained, "the checkpoint's config"))  # as read now: compile False is 'off'
    def shown(value):  # as typed after --set: words unquoted (off, not YAML 1.1's 'off')
        return value if isinstance(value, str) and value else _as_typed(value)
    return [f"{key}={shown(after[sec][leaf])} (the run had {shown(before[sec][leaf])})"
            for key in dotted_keys() if key != "train.steps"
            for sec, leaf in [key.split(".")] if sec in ("run", "train")
            if leaf in trained.get(sec, {}) and before[sec][leaf] != after[sec][leaf]]


# ---------------------------------------------------------------------------- files


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML keeps the last one without a word."""

    def construct_mapping(self, node, deep=False):
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key_node.value}' is given twice (first on line {first_line[key_node.value]}), "
                    "and only the last would count — keep one", key_node.start_mark)
            first_line[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_NULL = "tag:yaml.org,2002:null"


class _ConfigLoader(_UniqueKeyLoader):
    """Unquoted values stay text (PlainText), read by the type of their key; only null (and merges) keep YAML's
    meaning."""

    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag in (_NULL, "tag:yaml.org,2002:merge")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_yaml_str(self, node):
        text = super().construct_yaml_str(node)
        return PlainText(text) if node.style is None else text


_ConfigLoader.add_constructor("tag:yaml.org,2002:str", _ConfigLoader.construct_yaml_str)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `overrides`; validated once at the end."""
    if path is None:
        cfg = default_config()
    else:
        p = Path(path)
        if not str(path).strip():
            raise UserError("--config was given an empty path — pass a YAML file, or leave --config out for the "
                            "bundled digits")
        if not p.exists():
            raise UserError(f"config file not found: {path} — pass an existing YAML file to --config")
        if p.is_dir():
            raise UserError(f"config path {path} is a directory — pass a YAML file to --config")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            tabs = " — indent with spaces, not tabs" if "'\\t'" in str(e) else ""
            raise UserError(f"config file {path} is not valid YAML ({_yaml_problem(e)}){tabs}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"cannot read config file {path}: it is not UTF-8 text ({e.reason} at byte {e.start}) "
                            "— save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"cannot read config file {path}: {e}") from None
        if not isinstance(raw, Mapping):
            got = "nothing (empty file)" if raw is None else f"a {type(raw).__name__}"
            raise UserError(
                f"config file {path} must be a YAML mapping of sections (run, data, model, train), got {got}"
            )
        cfg = _build(raw, str(path))
    # Range checks wait until overrides are in, so an override can repair a file's value.
    cfg = _apply(cfg, overrides)
    validate(cfg)
    _check_for_training(cfg)
    return cfg


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    return text.removesuffix("\n...\n").strip()  # a bare scalar gets an explicit document end


def config_to_yaml(cfg: Config, header: str = "") -> str:
    """YAML text listing every key with its meaning as a comment; `load_config` reads it back equal."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    rows: list[tuple[str, str]] = []
    for sec in _SECTIONS:
        rows.append((f"{sec}:", ""))
        part = getattr(cfg, sec)
        for f in dataclasses.fields(part):
            rows.append((f"  {f.name}: {_yaml_value(getattr(part, f.name))}", _help(f)))
    width = max(len(text) for text, _ in rows)
    for text, help in rows:
        lines.append(f"{text.ljust(width)}  # {help}" if help else text)
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | os.PathLike, header: str = "") -> None:
    """Write `cfg` as commented YAML, atomically, so a crash leaves no half file."""
    text = config_to_yaml(cfg, header)
    atomic_write(path, lambda f: f.write(text), mode="w")


# ---------------------------------------------------------------------------- validation


def _check_splines(model: ModelConfig) -> None:
    # One bin with its ends and end derivatives fixed is the identity whatever the network says: nothing to learn.
    # (Required only where a spline is used, so that a run without one whose config said 1 still loads.)
    fewest = 1 if "model.spline_bins" in unused_model_keys(model) else 2
    _require(fewest <= model.spline_bins < 1000, "model.spline_bins", model.spline_bins, "use 2 to 999 bins")
    _require(model.spline_bound > 0, "model.spline_bound", model.spline_bound, "use a bound > 0")


def _check_for_training(cfg: Config) -> None:
    # Checked for configs about to train or prepare (load_config, apply_overrides), not in validate: a run trained
    # before a check came must still load for sample and eval.
    _check_data_root(cfg.data)
    _require(cfg.train.n_samples <= GRID_LIMIT, "train.n_samples", cfg.train.n_samples,
             f"a grid holds at most {GRID_LIMIT:,} images (glowtrain sample --n N --individual draws more)")


def _check_data_root(data: DataConfig) -> None:
    # An empty root reads the working directory (Path('') is '.'), which fails far from its cause, e.g. as an
    # output folder "inside the image folder ()". The bundled digits ignore the root, and so does a prepared cache.
    # A run trained before this check stores root '' and must still load for sample, and for eval --data.
    if data.dataset == "digits" or data.cache or data.root.strip():
        return
    if data.reads_image_files:
        fix = "set it to the folder holding your images, e.g. --set data.root=path/to/images"
    else:
        fix = (f"set it to the folder holding the {data.dataset} files (or where data.download=true puts them), "
               f"e.g. --set data.root={_default(_FIELDS['data.root'])} (the default)")
    raise UserError(f"data.root is empty — {fix}")


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is not allowed — {rule}")


def validate(cfg: Config) -> None:
    """Raise UserError naming the first key whose value is of the wrong type or out of range."""
    for sec in _SECTIONS:  # configs built in Python skip the loader's type checks
        part = getattr(cfg, sec)
        for f in dataclasses.fields(part):
            key, value = f"{sec}.{f.name}", getattr(part, f.name)
            if _coerce(key, value, f.type) != value:  # text such as "1e-3" passes _coerce but is no number
                raise _type_error(key, value, f.type)
    run, data, model, train = cfg.run, cfg.data, cfg.model, cfg.train

    name = run.name
    _require(bool(name) and name not in {".", ".."} and not re.search(r"[/\\]", name),
             "run.name", name, "use a plain directory name (no slashes)")
    # Up to torch's 2**64 - 1 here, so that a run an earlier glowtrain trained with such a seed still loads and
    # resumes as it was trained; a new run is held to SEED_LIMIT (check_new_run).
    _require(0 <= run.seed < 2**64, "run.seed", run.seed, "use an integer from 0 to 2**32 - 1")
    _require(DEVICE_PATTERN.fullmatch(run.device) is not None, "run.device", run.device,
             "use auto, cpu, cuda, cuda:N or mps")
    _require(run.threads >= 0, "run.threads", run.threads, "use 0 (torch's choice) or a number of threads")

    _require(1 <= data.n_bits <= 8, "data.n_bits", data.n_bits, "use an integer from 1 to 8")
    _require(data.channels in CHANNEL_CHOICES, "data.channels", data.channels, "use 1 (greyscale) or 3 (RGB)")
    fixed = FIXED_CHANNELS.get(data.dataset)
    _require(fixed is None or data.channels == fixed, "data.channels", data.channels,
             f"{data.dataset} images have {fixed} channel{'s' if fixed != 1 else ''}; set data.channels={fixed}")
    _require(data.image_size >= 1, "data.image_size", data.image_size, "use a positive size in pixels")
    _require(0 < data.test_fraction < 1, "data.test_fraction", data.test_fraction,
             "use a fraction strictly between 0 and 1")
    _require(data.n_workers >= 0, "data.n_workers", data.n_workers, "use 0 or more worker processes")
    _require(data.labels == "none" or data.dataset == "folder", "data.labels", data.labels,
             "subfolder labels are for data.dataset: folder; the other datasets bring their own labels")

    for key in ("n_levels", "n_steps", "hidden_channels", "dequant_steps", "dequant_hidden_channels"):
        _require(getattr(model, key) >= 1, f"model.{key}", getattr(model, key), "use an integer >= 1")
    _check_splines(model)
    _require(model.n_classes >= 0, "model.n_classes", model.n_classes, "use 0 (unconditional) or the class count")
    # Each level halves the spatial size with a squeeze, so the size must survive L halvings.
    factor = 2**model.n_levels
    if data.image_size % factor:
        raise UserError(
            f"data.image_size={data.image_size} is not divisible by 2**model.n_levels={factor}"
            f" — use a multiple of {factor} or fewer levels"
        )

    positive = ("steps", "batch_size", "grad_accum_steps", "init_batch_size", "eval_batch_size", "n_samples",
                "max_bad_steps", "log_every", "eval_every", "sample_every", "checkpoint_every")
    for key in positive:
        _require(getattr(train, key) >= 1, f"train.{key}", getattr(train, key), "use an integer >= 1")
    _require(train.lr > 0, "train.lr", train.lr, "use a learning rate > 0")
    _require(train.warmup_steps >= 0, "train.warmup_steps", train.warmup_steps, "use 0 or more steps")
    for key in ("weight_decay", "grad_clip", "class_weight"):
        _require(getattr(train, key) >= 0, f"train.{key}", getattr(train, key), "use a value >= 0 (0 = off)")
    _require(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", train.min_lr_ratio, "use a fraction from 0 to 1")
    _require(0 <= train.ema_decay < 1, "train.ema_decay", train.ema_decay, "use a decay in [0, 1) (0 = off)")
    max_time = duration_seconds(train.max_time)
    _require(max_time is None or max_time > 0, "train.max_time", train.max_time,
             "use a positive duration like 3h50m ('' = no limit)")
    temps = train.sample_temperatures
    _require(len(temps) >= 1 and all(t >= 0 for t in temps), "train.sample_temperatures", temps,
             "list at least one temperature, each >= 0")
