"""Config loading, overrides, validation messages and YAML round trips."""

import dataclasses
import os
import re
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from glowtrain.config import (
    Config,
    CouplingKind,
    PlainText,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    default_config,
    derived_seed,
    describe_keys,
    dotted_keys,
    load_config,
    save_config,
    validate,
)
from glowtrain.errors import UserError
from glowtrain.model import Glow

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def raises(match: str):
    return pytest.raises(UserError, match=match)


def override(*items: str) -> Config:
    return load_config(None, list(items))


# ---------------------------------------------------------------------------- defaults and shipped files


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == default_config() == Config()
    validate(cfg)
    assert cfg.data.dataset == "digits" and cfg.run.name == "digits"
    assert cfg.image_shape == (1, 8, 8) and cfg.data.n_bins == 16


def test_expected_configs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"digits", "mnist", "cifar10", "celeba", "celebahq256", "folder"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_validates_and_names_its_run(path):
    cfg = load_config(path)
    validate(cfg)
    assert cfg.run.name == path.stem


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_lists_every_key_with_a_comment(path):
    raw = yaml.safe_load(path.read_text())
    listed = [f"{sec}.{key}" for sec, body in raw.items() for key in body]
    assert listed == dotted_keys()
    for line in path.read_text().splitlines():
        if line.startswith("  "):
            assert "  # " in line, line


def test_digits_yaml_equals_the_defaults():
    assert load_config(CONFIGS / "digits.yaml") == default_config()


def test_the_digits_default_is_spline_couplings_with_learned_dequantisation_for_427_steps():
    """README "Results": this beat affine couplings with uniform noise (1,000 steps) in the same wall-clock time."""
    cfg = default_config()
    assert (cfg.model.coupling, cfg.model.dequantization, cfg.train.steps) == ("spline", "variational", 427)
    flowpp = load_config(CONFIGS / "digits-flowpp.yaml")
    assert dataclasses.replace(flowpp, run=cfg.run, train=dataclasses.replace(flowpp.train, compile="auto")) == cfg


@pytest.mark.parametrize("name,coupling", [("cifar10", "affine"), ("celeba", "additive"),
                                           ("celebahq256", "additive"), ("mnist", "affine"), ("folder", "affine")])
def test_the_glow_configs_keep_their_couplings_and_uniform_noise(name, coupling):
    model = load_config(CONFIGS / f"{name}.yaml").model
    assert (model.coupling, model.dequantization) == (coupling, "uniform")


def test_cifar10_yaml_follows_the_glow_paper_setup():
    cfg = load_config(CONFIGS / "cifar10.yaml")
    assert (cfg.model.n_levels, cfg.model.n_steps, cfg.model.hidden_channels) == (3, 32, 512)
    assert (cfg.model.coupling, cfg.model.conv, cfg.data.n_bits) == ("affine", "lu", 8)
    assert cfg.image_shape == (3, 32, 32) and cfg.data.hflip


def test_config_objects_are_immutable_but_replaceable():
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5))
    assert changed.train.lr == 0.5 and cfg.train.lr == default_config().train.lr


def test_default_lists_are_not_shared_between_configs():
    a, b = default_config(), default_config()
    a.train.sample_temperatures.append(0.1)
    assert b.train.sample_temperatures == [0.7, 1.0]


def test_describe_keys_covers_every_key_with_a_meaning():
    rows = describe_keys()
    assert [key for key, _, _ in rows] == dotted_keys()
    assert all(meaning for _, _, meaning in rows)
    assert dict((k, d) for k, d, _ in rows)["train.lr"] == repr(default_config().train.lr)
    assert "affine, additive" in dict((k, m) for k, _, m in rows)["model.coupling"]


# ---------------------------------------------------------------------------- overrides


def test_float_override_in_exponent_form_becomes_a_float():
    cfg = override("train.lr=5e-4")
    assert cfg.train.lr == 5e-4 and type(cfg.train.lr) is float


def test_int_override_stays_an_int_and_int_is_accepted_for_float():
    cfg = override("model.n_steps=16", "train.grad_clip=10")
    assert cfg.model.n_steps == 16 and type(cfg.model.n_steps) is int
    assert cfg.train.grad_clip == 10.0 and type(cfg.train.grad_clip) is float


def test_list_override_accepts_ints_inside_and_converts_them():
    cfg = override("train.sample_temperatures=[0.5,1]")
    assert cfg.train.sample_temperatures == [0.5, 1.0]
    assert all(type(t) is float for t in cfg.train.sample_temperatures)


@pytest.mark.parametrize("text, temperatures", [("0.7", [0.7]), ("1", [1.0]), ("1e-1", [0.1])])
def test_a_lone_number_for_a_list_key_is_a_one_element_list(tmp_path, text, temperatures):
    cfg = override(f"train.sample_temperatures={text}")
    assert cfg.train.sample_temperatures == temperatures and type(cfg.train.sample_temperatures[0]) is float
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  sample_temperatures: {text}\n")
    assert load_config(path).train.sample_temperatures == temperatures


def test_a_lone_negative_temperature_is_range_checked_like_a_list():
    with raises(r"^train\.sample_temperatures=\[-0\.5\] is not allowed — list at least one temperature, each >= 0$"):
        override("train.sample_temperatures=-0.5")


def test_string_override_keeps_the_text_as_written():
    cfg = override("run.name=007", "data.cache=", "data.root=some/dir")
    assert (cfg.run.name, cfg.data.cache, cfg.data.root) == ("007", "", "some/dir")


def test_bool_and_literal_overrides():
    cfg = override("data.hflip=true", "model.coupling=additive", "train.amp=bf16")
    assert cfg.data.hflip is True and cfg.model.coupling == "additive" and cfg.train.amp == "bf16"


def test_later_override_wins_and_overrides_beat_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=0.1", "train.lr=0.2"])
    assert cfg.train.lr == 0.2


def test_override_can_repair_a_file_value_before_range_checks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 30\n")
    assert load_config(path, ["data.image_size=32"]).data.image_size == 32


def test_apply_overrides_returns_a_new_config_and_leaves_the_old_one():
    base = default_config()
    cfg = apply_overrides(base, ["train.steps=3"])
    assert cfg.train.steps == 3 and base.train.steps == default_config().train.steps


@pytest.mark.parametrize("text", ["train", "train.lr", "lr=0.1", ".lr=0.1", "train.=0.1", "=1"])
def test_malformed_override_names_the_expected_form(text):
    with raises(r"--set section\.key=value"):
        override(text)


def test_override_with_invalid_yaml_value_is_a_user_error():
    with raises(r"train\.sample_temperatures=\[0\.5,.*not valid YAML"):
        override("train.sample_temperatures=[0.5,")


# ---------------------------------------------------------------------------- unknown keys and types


def test_unknown_key_names_the_key_and_the_closest_valid_key():
    with raises(r"unknown key 'train\.lrate' in .* — did you mean 'train\.lr'\?"):
        override("train.lrate=1e-3")


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nlevels: 3\n")
    with raises(r"unknown key 'model\.nlevels' in .*bad\.yaml — did you mean 'model\.n_levels'"):
        load_config(path)


def test_unknown_section_suggests_the_section():
    with raises(r"unknown key 'trian' in cfg — did you mean 'train'"):
        config_from_dict({"trian": {"lr": 0.1}}, source="cfg")


def test_key_in_the_wrong_section_suggests_the_right_one():
    with raises(r"unknown key 'model\.lr'.*did you mean 'train\.lr'"):
        config_from_dict({"model": {"lr": 0.1}})


@pytest.mark.parametrize("given, meant", [("train.learning_rate", "train.lr"), ("model.depth", "model.n_steps"),
                                          ("model.width", "model.hidden_channels"), ("data.n_bits_x", "data.n_bits"),
                                          ("train.epochs", "train.steps"), ("data.num_workers", "data.n_workers")])
def test_unknown_key_named_as_other_trainers_name_it_gets_ours(given, meant):
    """openai/glow's flags and common names: train.learning_rate was offered train.min_lr_ratio."""
    with raises(rf"^unknown key '{given}' in --set {given}=1 — did you mean '{meant}'\?$"):
        load_config(None, [f"{given}=1"])


def test_unknown_key_far_from_any_key_has_no_hint():
    with pytest.raises(UserError) as info:
        override("zzz.qqqqq=1")
    assert "unknown key 'zzz.qqqqq'" in str(info.value) and "did you mean" not in str(info.value)


def test_wrong_type_message_names_key_value_and_expected_type():
    with raises(r"^train\.lr: expected a number, got 'abc' — use a value like train\.lr=0\.03 \(the default\)$"):
        override("train.lr=abc")


@pytest.mark.parametrize("item, message", [
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5 — use a value like train.steps=427 (the default)"),
    ("data.hflip=maybe",
     "data.hflip: expected true or false, got 'maybe' — use a value like data.hflip=false (the default)"),
    ("model.spline_bound=wide",
     "model.spline_bound: expected a number, got 'wide' — use a value like model.spline_bound=3.0 (the default)"),
    ("train.sample_temperatures=[a]", "train.sample_temperatures: expected a list of numbers, got ['a'] — use a "
     "value like train.sample_temperatures=[0.7,1.0] (the default)"),
    ("train.sample_temperatures=a", "train.sample_temperatures: expected a list of numbers, got 'a' — use a "
     "value like train.sample_temperatures=[0.7,1.0] (the default)"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf — use a value like train.lr=0.03 (the default)"),
], ids=["int", "bool", "float", "list-item", "list-scalar", "infinite"])
def test_wrong_type_message_ends_with_the_default_written_as_an_override(item, message):
    with pytest.raises(UserError) as refused:
        override(item)
    assert str(refused.value) == message
    key, example = message.split(" — use a value like ")[1].removesuffix(" (the default)").split("=")
    assert override(f"{key}={example}") == default_config()  # the example, typed as shown, is the default


def test_a_type_error_in_a_file_names_the_same_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name:\ndata:\n  cache:\n")
    with raises(r"^run\.name: expected a string, got None — use a value like run\.name=digits \(the default\)$"):
        load_config(path)
    path.write_text("data:\n  cache:\n")
    with raises(r"^data\.cache: expected a string, got None — use a value like data\.cache='' \(the default\)$"):
        load_config(path)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("model.n_steps", 16.0, "an integer"),  # integral floats are not silently truncated
        ("model.n_steps", True, "an integer"),  # bool is not a number here
        ("train.lr", False, "a number"),
        ("data.hflip", 1, "true or false"),
        ("train.sample_temperatures", "hot", "a list of numbers"),  # a lone value must still be a number
        ("train.sample_temperatures", True, "a list of numbers"),
        ("train.sample_temperatures", [0.7, "hot"], "a list of numbers"),
        ("run.name", None, "a string"),
    ],
)
def test_wrong_types_are_rejected(key, value, expected):
    sec, leaf = key.split(".")
    with raises(f"{key}: expected {expected}"):
        config_from_dict({sec: {leaf: value}})


def test_a_wrong_type_given_on_top_of_a_config_offers_that_configs_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  steps: 100000\n")
    with raises(r"train\.steps: expected an integer, got 'abc' — use a value like train\.steps=100000 "
                r"\(the config's\)"):
        load_config(path, ["train.steps=abc"])
    with raises(r"train\.lr: expected a number, got 'fast' — use a value like train\.lr=0\.03 \(the default\)"):
        load_config(path, ["train.lr=fast"])


def test_literal_message_lists_the_choices_and_ends_with_the_fix():
    kinds = re.escape(", ".join(repr(kind) for kind in get_args(CouplingKind)))  # a new coupling kind joins them
    with raises(rf"^model\.coupling: expected one of {kinds}, got 'afine' — use model\.coupling=affine$"):
        override("model.coupling=afine")
    with raises(rf"^model\.dequant_coupling: expected one of {kinds}, got 'foo' — use one of them, e\.g\. "
                r"model\.dequant_coupling=spline \(the default\)$"):
        override("model.dequant_coupling=foo")


def test_yaml_boolean_words_for_literal_fields_get_a_quoting_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: on\n")  # amp has no 'on'
    with raises("quote the word"):
        load_config(path)


def test_off_and_on_read_as_yaml_booleans_mean_the_words_where_the_key_has_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n  compile: on\n")
    cfg = load_config(path)
    assert (cfg.train.amp, cfg.train.compile) == ("off", "on")
    assert override("train.amp=off").train.amp == "off" and override("train.compile=no").train.compile == "off"


def test_a_dotted_key_in_a_yaml_file_is_shown_nested(tmp_path):
    path = tmp_path / "dotted.yaml"
    path.write_text("train.lr: 0.01\n")
    with raises(r"unknown key 'train\.lr' in .*dotted\.yaml — in a YAML file write it nested: 'train:' and on the "
                r"next line, indented, 'lr: \.\.\.'"):
        load_config(path)


def test_a_max_time_is_read_as_a_clock_in_a_file_and_a_number_or_two_parts_are_refused(tmp_path):
    """YAML 1.1 read `max_time: 1:30:00` as 5400 (base 60), which was refused as a number without a unit."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_time: 1:30:00\n")
    assert load_config(path).train.max_time_s == 5400
    assert load_config(None, ["train.max_time=0:00:45.5"]).train.max_time_s == 45.5
    with raises(r"^train\.max_time='5400' is a number without a unit — write 5400s, or hours and minutes like "
                r"1h30m$"):
        load_config(None, ["train.max_time=5400"])
    with raises(r"^train\.max_time='1:30' is not a duration \(hours:minutes or minutes:seconds\? write 1h30m or "
                r"1m30s\) — use hours, minutes and seconds like 3h50m, 90m, 45s or 3:50:00 \('' = no limit\)$"):
        load_config(None, ["train.max_time=1:30"])


def test_non_finite_floats_are_rejected():
    with raises(r"train\.lr: expected a finite number"):
        override("train.lr=.inf")
    with raises(r"train\.sample_temperatures: expected finite numbers, got \[0\.7, nan\]"):
        override("train.sample_temperatures=[0.7,.nan]")


def test_empty_section_keeps_defaults():
    assert config_from_dict({"train": None}) == default_config()


def test_non_mapping_section_and_top_level_are_rejected():
    with raises(r"section 'train' in cfg must be a mapping"):
        config_from_dict({"train": [1, 2]}, source="cfg")
    with raises(r"cfg must be a mapping of sections \(run, data, model, train\), got a list$"):
        config_from_dict([1, 2], source="cfg")  # type: ignore[arg-type]
    with raises(r"section 'train' in cfg must be a mapping of key: value, got '5'$"):
        config_from_dict({"train": PlainText("5")}, source="cfg")  # `train: 5`: read as its text, named as such


# ---------------------------------------------------------------------------- range checks


@pytest.mark.parametrize(
    "item, key",
    [
        ("data.n_bits=0", "data.n_bits"),
        ("data.n_bits=9", "data.n_bits"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.001", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.init_batch_size=0", "train.init_batch_size"),
        ("train.eval_batch_size=0", "train.eval_batch_size"),
        ("train.steps=0", "train.steps"),
        ("model.n_levels=0", "model.n_levels"),
        ("model.n_steps=0", "model.n_steps"),
        ("model.hidden_channels=0", "model.hidden_channels"),
        ("model.n_classes=-1", "model.n_classes"),
        ("train.sample_temperatures=[0.7,-0.1]", "train.sample_temperatures"),
        ("train.sample_temperatures=[]", "train.sample_temperatures"),
        ("train.ema_decay=1", "train.ema_decay"),
        ("train.ema_decay=-0.1", "train.ema_decay"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.test_fraction=1", "data.test_fraction"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.log_every=0", "train.log_every"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.sample_every=0", "train.sample_every"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("data.channels=2", "data.channels"),
        ("run.device=gpu", "run.device"),
        ("run.device=cuda:x", "run.device"),
        ("run.name=a/b", "run.name"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("model.spline_bins=1", "model.spline_bins"),  # one bin with fixed ends is the identity
        ("model.spline_bins=1000", "model.spline_bins"),
        ("model.spline_bound=0", "model.spline_bound"),
    ],
)
def test_out_of_range_values_are_rejected_naming_key_and_value(item, key):
    value = item.split("=", 1)[1]
    with pytest.raises(UserError) as info:
        override(item)
    message = str(info.value)
    assert message.startswith(f"{key}=") and "not allowed —" in message
    assert value.strip("[]").split(",")[-1] in message


def test_one_spline_bin_is_refused_only_where_a_spline_is_used():
    for layers in (["model.coupling=spline"], ["model.coupling=affine", "model.dequant_coupling=spline"]):
        with pytest.raises(UserError, match="model.spline_bins=1 is not allowed"):
            load_config(None, [*layers, "model.spline_bins=1"])
    unused = load_config(None, ["model.coupling=affine", "model.dequantization=uniform", "model.spline_bins=1"])
    assert unused.model.spline_bins == 1


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_devices_are_accepted(device):
    assert override(f"run.device={device}").run.device == device


def test_boundary_values_are_accepted():
    cfg = override("data.n_bits=1", "train.ema_decay=0", "train.warmup_steps=0", "model.n_classes=0",
                   "train.sample_temperatures=[0]", "train.grad_clip=0")
    assert cfg.data.n_bits == 1 and cfg.train.ema_decay == 0.0


def test_image_size_must_survive_every_squeeze():
    with raises(r"^data\.image_size=30 is not divisible by 2\*\*model\.n_levels=8 — "
                r"use a multiple of 8 or fewer levels$"):
        override("data.image_size=30", "model.n_levels=3")
    assert override("data.image_size=16", "model.n_levels=4").data.image_size == 16


def test_channels_must_match_a_fixed_channel_dataset():
    with raises(r"data\.channels=1 .*cifar10 images have 3 channels"):
        override("data.dataset=cifar10")
    assert override("data.dataset=cifar10", "data.channels=3").image_shape == (3, 8, 8)


FOLDER_ROOT_FIX = "data.root is empty — set it to the folder holding your images, e.g. --set data.root=path/to/images"


@pytest.mark.parametrize("dataset, message", [
    ("folder", FOLDER_ROOT_FIX),
    ("celeba", FOLDER_ROOT_FIX),
    ("mnist", "data.root is empty — set it to the folder holding the mnist files (or where data.download=true puts "
              "them), e.g. --set data.root=data (the default)"),
    ("cifar10", "data.root is empty — set it to the folder holding the cifar10 files (or where data.download=true "
                "puts them), e.g. --set data.root=data (the default)"),
], ids=["folder", "celeba", "mnist", "cifar10"])
def test_an_empty_data_root_is_refused_naming_the_fix(tmp_path, dataset, message):
    channels = "data.channels=3" if dataset != "mnist" else "data.channels=1"
    for root in ("data.root=", "data.root=  "):
        with pytest.raises(UserError) as refused:
            override(f"data.dataset={dataset}", channels, root)
        assert str(refused.value) == message
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  dataset: {dataset}\n  {channels.replace('data.', '').replace('=', ': ')}\n"
                    "  root: ''\n")
    with pytest.raises(UserError) as refused:
        load_config(path)
    assert str(refused.value) == message


def test_a_stored_config_with_an_empty_root_still_loads_for_commands_that_need_no_data():
    # Runs trained before the check store root '' (the working directory): sample must still load them, eval
    # --data must be able to relocate them, and a resume is refused until --set data.root names the folder.
    stored = config_to_dict(override("data.dataset=folder", "data.channels=3", "data.root=images"))
    stored["data"]["root"] = ""
    assert config_from_dict(stored).data.root == ""
    with pytest.raises(UserError, match="^data.root is empty"):
        apply_overrides(config_from_dict(stored), [])
    assert apply_overrides(config_from_dict(stored), ["data.root=images"]).data.root == "images"


def test_more_samples_than_a_grid_holds_are_refused_for_training_but_a_stored_run_still_loads():
    with pytest.raises(UserError) as refused:
        override("train.n_samples=1025")
    assert str(refused.value) == ("train.n_samples=1025 is not allowed — a grid holds at most 1,024 images (glowtrain "
                                  "sample --n N --individual draws more)")
    assert override("train.n_samples=1024").train.n_samples == 1024
    stored = config_to_dict(default_config())
    stored["train"]["n_samples"] = 20000  # trained before the check: sample and eval read it as it is
    assert config_from_dict(stored).train.n_samples == 20000
    assert apply_overrides(config_from_dict(stored), ["train.n_samples=64"]).train.n_samples == 64  # a resume's fix


def test_a_spline_bound_far_beyond_the_flows_values_is_refused_for_a_new_run_where_splines_are_used():
    from glowtrain.config import check_new_run

    with pytest.raises(UserError) as refused:
        check_new_run(override("model.spline_bound=1e6"))
    assert str(refused.value) == ("model.spline_bound=1000000.0 is not allowed — use a bound up to 50 (the flow's "
                                  "values are of order 1: wider bins train badly or to non-finite losses; the default "
                                  "3 covers them)")
    check_new_run(override("model.spline_bound=50"))
    from glowtrain.train import fit_config

    with pytest.raises(UserError, match="^model.spline_bound=1000000.0 is not allowed"):  # fit --nproc: before any
        fit_config(None, ["model.spline_bound=1e6"], None, None)                      # process starts
    check_new_run(override("model.coupling=affine", "model.dequantization=uniform", "model.spline_bound=1e6"))  # unused
    stored = config_to_dict(default_config())
    stored["model"]["spline_bound"] = 1e3  # trained before the limit: it still loads, and resumes with --set
    assert apply_overrides(config_from_dict(stored), ["train.steps=5"]).model.spline_bound == 1e3


@pytest.mark.parametrize("key, value", [("model.dequant_steps", 9), ("model.dequant_hidden_channels", 128),
                                        ("model.dequant_coupling", "affine"), ("model.spline_bins", 50),
                                        ("model.spline_bound", 5.0)])
def test_a_resume_may_change_a_key_its_model_does_not_use_but_not_one_it_uses(key, value):
    from glowtrain.config import check_resume_config

    unused = override("model.coupling=affine", "model.dequantization=uniform")
    check_resume_config(unused, apply_overrides(unused, [f"{key}={value}"]))  # nothing is built from it
    used = override("model.coupling=spline", "model.dequantization=variational", "model.dequant_coupling=spline")
    with raises(f"^{key} cannot change when resuming"):
        check_resume_config(used, apply_overrides(used, [f"{key}={value}"]))
    with raises("cannot change when resuming"):  # nor switching on what uses it
        check_resume_config(unused, apply_overrides(unused, ["model.dequantization=variational", f"{key}={value}"]))


def test_an_empty_data_root_is_fine_where_nothing_reads_it():
    assert override("data.root=").data.root == ""  # the bundled digits
    cached = override("data.dataset=folder", "data.root=", "data.cache=prepared/folder-8px")
    assert (cached.data.root, cached.data.cache) == ("", "prepared/folder-8px")  # images come from the cache


def test_validate_catches_wrong_types_in_configs_built_in_python():
    cfg = dataclasses.replace(default_config(), model=dataclasses.replace(default_config().model, n_steps="8"))
    with raises(r"model\.n_steps: expected an integer"):
        validate(cfg)
    cfg = dataclasses.replace(default_config(), train=dataclasses.replace(default_config().train, lr="1e-3"))
    with raises(r"train\.lr: expected a number, got '1e-3' — use a value like train\.lr=0\.03"):
        validate(cfg)
    cfg = dataclasses.replace(default_config(), train=dataclasses.replace(default_config().train,
                                                                          sample_temperatures=0.7))
    with raises(r"train\.sample_temperatures: expected a list of numbers, got 0\.7"):
        validate(cfg)  # a lone number is read as a list from YAML, but a Config built in Python holds a list


# ---------------------------------------------------------------------------- files


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = override("run.name=x y", "train.lr=3e-5", "train.sample_temperatures=[0.5,0.6,1]", "train.amp=bf16",
                   "data.cache=cache/a.npy", "data.dataset=celeba", "data.channels=3", "model.conv=shuffle",
                   "run.device=cuda:0", "model.learn_top=false")
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_to_dict(load_config(path)) == config_to_dict(cfg)


def test_save_config_writes_atomically_leaving_no_temp_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    save_config(default_config(), path)
    assert load_config(path) == default_config()
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_config_to_dict_is_plain_nested_dicts():
    d = config_to_dict(default_config())
    assert set(d) == {"run", "data", "model", "train"}
    assert d["train"]["sample_temperatures"] == [0.7, 1.0] and type(d["train"]) is dict
    assert config_from_dict(d) == default_config()


def test_missing_file_tells_to_pass_an_existing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with raises(r"config file not found: .*nope\.yaml — pass an existing YAML file to --config"):
        load_config(missing)


def test_file_that_is_not_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n  lr: :\n")
    with raises(r"broken\.yaml is not valid YAML"):
        load_config(path)


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  lr: 0.001\n  steps: 100\n  lr: 0.01\nmodel:\n  n_steps: 4\n")
    with pytest.raises(UserError) as refused:
        load_config(path)
    assert str(refused.value) == (f"config file {path} is not valid YAML (line 4: 'lr' is given twice (first on line "
                                  "2), and only the last would count — keep one)")
    path.write_text("train:\n  lr: 0.001\ntrain:\n  steps: 5\n")
    with raises(r"line 3: 'train' is given twice \(first on line 1\)"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", ""])
def test_file_that_is_not_a_mapping_names_the_file(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with raises(r"list\.yaml must be a YAML mapping"):
        load_config(path)


def test_directory_as_config_is_a_user_error(tmp_path):
    with raises("is a directory"):
        load_config(tmp_path)


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key in dotted_keys() if f"`{key}`" not in readme]
    assert not missing, f"README.md lacks {missing}: run scripts/refresh_config_docs.py"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_comments_match_the_key_meanings(path):
    text = path.read_text()
    body = text[text.index("run:"):]
    assert body == config_to_yaml(load_config(path)), "run scripts/refresh_config_docs.py to bring it in line"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_builds_its_model(path):

    cfg = load_config(path)
    with torch.device("meta"):  # shapes only: the paper-size models hold up to 175M parameters
        model = Glow.from_config(cfg)
    assert model.image_shape == cfg.image_shape
    assert len(model.levels) == cfg.model.n_levels and len(model.levels[0].layers) == cfg.model.n_steps


def test_readme_lists_which_keys_a_resumed_run_may_change():
    from glowtrain.config import RESUME_SAFE_DATA_KEYS, resume_may_change

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("<!-- resume-keys -->"):readme.index("<!-- /resume-keys -->")]
    assert all(f"`{key}`" in section for key in RESUME_SAFE_DATA_KEYS)
    refused = [key for key in dotted_keys() if not resume_may_change(key)]
    assert refused and all(key.startswith(("data.", "model.")) for key in refused)
    assert "`data.*`" in section and "`model.*`" in section and "`train.*`" in section
    assert "but `train.optimizer`" in section  # refused on its own when resuming (train._check_optimizer)


@pytest.mark.parametrize("text,seconds", [("", None), ("45s", 45.0), ("90m", 5400.0), ("3h50m", 13800.0),
                                          ("1.5h", 5400.0), ("1h2m3s", 3723.0)])
def test_max_time_reads_hours_minutes_and_seconds(text, seconds):
    assert load_config(None, [f"train.max_time={text}"]).train.max_time_s == seconds


@pytest.mark.parametrize("text", ["soon", "10", "5d", "0s", "m"])
def test_max_time_that_is_not_a_positive_duration_is_a_user_error(text):
    with pytest.raises(UserError, match="train.max_time"):
        load_config(None, [f"train.max_time={text}"])


def test_data_paths_are_stored_absolute_except_the_unused_root_of_the_bundled_digits(tmp_path, monkeypatch):
    from glowtrain.config import with_absolute_data_paths

    monkeypatch.chdir(tmp_path)
    folder = with_absolute_data_paths(apply_overrides(default_config(), ["data.dataset=folder", "data.root=photos",
                                                                         "data.cache=photos/cache"]))
    assert (folder.data.root, folder.data.cache) == (str(tmp_path / "photos"), str(tmp_path / "photos" / "cache"))
    digits = with_absolute_data_paths(apply_overrides(default_config(), ["data.cache=mycache"]))
    assert (digits.data.root, digits.data.cache) == ("data", str(tmp_path / "mycache"))
    assert with_absolute_data_paths(default_config()).data.cache == ""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path / "runs")
    above = with_absolute_data_paths(apply_overrides(default_config(), ["data.dataset=folder", "data.root=../photos"]))
    assert above.data.root == str(tmp_path / "photos")  # not .../runs/../photos
    (tmp_path / "photos").mkdir()
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "photos").mkdir()
    os.symlink(tmp_path / "elsewhere" / "deep", tmp_path / "runs" / "link")  # link/.. is elsewhere, not runs
    linked = with_absolute_data_paths(apply_overrides(default_config(), ["data.dataset=folder",
                                                                         "data.root=link/../photos"]))
    assert linked.data.root == str(tmp_path / "runs" / "link" / ".." / "photos")  # as given: elsewhere/photos


def test_seeds_are_those_torchs_cpu_generator_tells_apart_and_their_streams_stay_within_torchs_range():
    def draws(seed):
        return torch.rand(4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draws(2**32 + 5), draws(5))  # why: the CPU generator reads 32 bits of a seed
    from glowtrain.config import check_new_run

    largest = 2**32 - 1
    check_new_run(apply_overrides(default_config(), [f"run.seed={largest}"]))
    older = apply_overrides(default_config(), [f"run.seed={largest + 1}"])  # what an earlier glowtrain allowed
    validate(older)  # such a run still loads (eval, sample, resume) ...
    with pytest.raises(UserError, match=r"run.seed=4294967296 is not allowed — use an integer from 0 to "
                                        r"2\*\*32 - 1 \(torch's CPU generator reads 32 bits"):
        check_new_run(older)  # ... but no new run starts with one
    with pytest.raises(UserError, match=r"run.seed=18446744073709551616 is not allowed"):
        validate(apply_overrides(default_config(), [f"run.seed={2**64}"]))
    for index in (0, 1, 10**9):
        torch.Generator().manual_seed(derived_seed(largest, index))  # raised an overflow above about 1.8e13
    firsts = {derived_seed(seed, 0) % 2**32 for seed in (0, 1, 2**31, largest)}
    assert len(firsts) == 4  # distinct seeds, distinct first streams on the CPU
    assert derived_seed(7, 3) == 7 * 1_000_003 + 3  # small seeds keep their streams, so old runs resume the same


def test_unquoted_values_are_read_as_their_keys_type_not_as_yaml_1_1_guesses(tmp_path):
    """YAML 1.1 read `seed: 010` as 8 (octal), `steps: 1:30` as 90 (base 60) and `name: 001` as the run `1`."""
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: 001\n  seed: 010\ndata:\n  split_seed: 0x10\n  hflip: Yes\n"
                    "train:\n  steps: 1_000\n  lr: 1e-3\n  amp: off\n  sample_temperatures: [0.5, 1]\n"
                    "  init_batch_size: 08\n")
    cfg = load_config(path)
    assert (cfg.run.name, cfg.run.seed, cfg.data.split_seed, cfg.data.hflip) == ("001", 10, 16, True)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.amp, cfg.train.sample_temperatures) == (1000, 1e-3, "off",
                                                                                             [0.5, 1.0])
    assert cfg.train.init_batch_size == 8  # YAML 1.1 refused 08 (not octal) as text
    for name in ("2024-01-05", "yes", "1:30", "0.10"):  # YAML 1.1: a date, true, 90, 0.1
        path.write_text(f"run:\n  name: {name}\n")
        assert load_config(path).run.name == name
    path.write_text("train:\n  steps: 1:30\n")
    with raises(r"^train\.steps: expected an integer, got '1:30' — use a value like train\.steps=427"):
        load_config(path)
    with raises(r"^train\.steps: expected an integer, got 1e5 — write it without a decimal point or exponent: "
                r"train\.steps=100000$"):
        load_config(None, ["train.steps=1e5"])
    with raises(r"^train\.lr: expected a finite number, got inf"):
        load_config(None, ["train.lr=.inf"])


def test_a_text_override_is_taken_as_written_even_with_a_hash_in_it():
    """`--set "run.name=exp #3"` named the run `exp`: YAML read ` #3` as a comment."""
    cfg = load_config(None, ["run.name=exp #3", "data.root=/tmp/my #1 dir", "data.cache='quoted #2'"])
    assert (cfg.run.name, cfg.data.root, cfg.data.cache) == ("exp #3", "/tmp/my #1 dir", "quoted #2")
    cfg = load_config(None, ["run.name=exp: lr 3e-4", "data.root=- x", "data.cache=[ablation]"])  # YAML: a mapping..
    assert (cfg.run.name, cfg.data.root, cfg.data.cache) == ("exp: lr 3e-4", "- x", "[ablation]")
    assert load_config(None, ["run.seed=08", "run.name=007"]).run.seed == 8


def test_config_file_and_override_slips_get_the_fix(tmp_path):
    (tmp_path / "tabs.yaml").write_text("train:\n\tsteps: 5\n")
    with raises(r"^config file .*tabs\.yaml is not valid YAML \(line 2: .*\) — indent with spaces, not tabs$"):
        load_config(tmp_path / "tabs.yaml")
    (tmp_path / "latin1.yaml").write_bytes("run:\n  name: café\n".encode("latin-1"))
    with raises(r"^cannot read config file .*latin1\.yaml: it is not UTF-8 text \(invalid continuation byte at byte "
                r"16\) — save it as UTF-8$"):
        load_config(tmp_path / "latin1.yaml")
    with raises(r"^--config was given an empty path — pass a YAML file"):  # it was read as '.', "a directory"
        load_config("")
    with raises(r"^malformed override 'lr=0\.1' — use the form --set section\.key=value, e\.g\. --set train\.lr=0\.1$"):
        load_config(None, ["lr=0.1"])
    with raises(r"^malformed override 'speed=1' — .* e\.g\. --set train\.lr=5e-4$"):
        load_config(None, ["speed=1"])


def test_numbers_are_read_only_for_number_keys_and_a_quoted_count_gets_no_decimal_point_advice(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1_000\n")
    assert load_config(path).train.lr == 1000.0  # YAML 1.1's underscores, kept for numbers
    path.write_text("data:\n  hflip: 1\n")
    with raises(r"^data\.hflip: expected true or false, got 1 — use a value like data\.hflip=false"):
        load_config(path)
    path.write_text("run:\n  seed: '5'\n")
    with raises(r"^run\.seed: expected an integer, got '5' — use a value like run\.seed=0 \(the default\)$"):
        load_config(path)


def test_a_resume_compares_settings_as_they_read_now_not_as_an_older_version_stored_them():
    """Runs trained before train.compile took words stored compile: false, which reads as 'off'."""
    from glowtrain.config import config_from_dict, settings_changed_on_resume

    stored = {"train": {"compile": False, "lr": 0.01}}
    assert settings_changed_on_resume(stored, config_from_dict(stored)) == []
    assert settings_changed_on_resume(stored, load_config(None, ["train.compile=on", "train.lr=0.01"])) == [
        "train.compile=on (the run had off)"]
