"""Mixed precision: which train.amp each device accepts, and fp16 training with a gradient scaler."""

import pytest
import torch
from helpers import GLOW_LAYERS

from glowtrain.checkpoint import load_checkpoint
from glowtrain.config import apply_overrides, default_config
from glowtrain.data import build_dataset
from glowtrain.distributed import Context
from glowtrain.errors import UserError
from glowtrain.flows import CouplingNet
from glowtrain.precision import check_amp
from glowtrain.runs import RunDir
from glowtrain.train import Trainer, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("amp", "device", "capability", "allow", "refused"), [
    ("fp16", CPU, None, False, "train.amp=fp16 needs a CUDA GPU"),
    ("fp16", CUDA, (7, 0), False, None),  # V100: fp16 is what it has
    ("bf16", CUDA, (7, 5), False, r"compute capability 7.5\) has no native bfloat16 .* train.allow_emulated_bf16=true"),
    ("bf16", CUDA, (7, 5), True, None),
    ("bf16", CUDA, (8, 0), False, None),
    ("bf16", CPU, None, False, None),
    ("off", CUDA, (6, 1), False, None),
])
def test_amp_is_refused_where_the_device_cannot_run_it(amp, device, capability, allow, refused):
    if refused is None:
        check_amp(amp, device, allow, capability)
    else:
        with pytest.raises(UserError, match=refused):
            check_amp(amp, device, allow, capability)


def test_fp16_on_a_cpu_stops_before_anything_is_written(tmp_path):
    cfg = apply_overrides(default_config(), ["run.device=cpu", "train.amp=fp16"])
    with pytest.raises(UserError, match="train.amp=fp16 needs a CUDA GPU"):
        train(cfg, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


FP16 = ["run.device=cpu", "model.n_levels=2", "model.n_steps=1", "model.hidden_channels=8", "train.batch_size=16",
        "train.init_batch_size=32", "train.eval_batch_size=300", "train.warmup_steps=0", "train.amp=fp16",
        "train.n_samples=1", "train.sample_temperatures=[0]", "train.max_bad_steps=5", *GLOW_LAYERS]


def _fp16_trainer(tmp_path, *extra) -> Trainer:
    """The fp16 code path on a CPU (CPU autocast does float16): train() refuses it there, a Trainer does not."""
    cfg = apply_overrides(default_config(), FP16 + list(extra))
    data = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    return Trainer(cfg, Context(device=CPU), RunDir(tmp_path / "run"), datasets=data, progress=False)


def test_fp16_runs_the_coupling_networks_in_float16_and_scales_the_loss(tmp_path):
    trainer = _fp16_trainer(tmp_path)
    assert trainer.model.amp_dtype == torch.float16 and trainer.scaler is not None
    computed = set()  # the dtype each coupling network's last convolution computes in
    for module in trainer.model.modules():
        if isinstance(module, CouplingNet):
            module.conv_out.register_forward_hook(lambda _, args, out: computed.add(out.dtype))
    for _ in range(3):
        images, labels = next(trainer.batches)
        metrics = trainer.train_step(images, labels)
        trainer.state.step += 1
    assert computed == {torch.float16}
    assert torch.isfinite(metrics.terms["bpd"]) and trainer.guard.read()[0] == 0
    assert trainer.scaler.get_scale() == 2.0**16  # no overflow, no growth yet


def test_an_fp16_overflow_is_a_skipped_step_that_halves_the_scale(tmp_path):
    trainer = _fp16_trainer(tmp_path)
    images, labels = next(trainer.batches)
    trainer.train_step(images, labels)
    before = [p.detach().clone() for p in trainer.objective.parameters()]
    trainer.scaler.update(2.0**100)  # a scale no float16 gradient survives
    trainer.train_step(images, labels)
    assert trainer.guard.read()[0] == 1  # counted like any non-finite step
    assert all(torch.equal(p, b) for p, b in zip(trainer.objective.parameters(), before))
    assert trainer.scaler.get_scale() == 2.0**99


def test_the_loss_scale_is_checkpointed_and_resumed(tmp_path):
    trainer = _fp16_trainer(tmp_path, "train.steps=2")
    trainer.train_step(*next(trainer.batches))
    trainer.state.step = 1
    trainer.scaler.update(1024.0)
    trainer.run()
    saved = load_checkpoint(trainer.run_dir.last)
    assert saved["grad_scaler"]["scale"] == 1024.0
    resumed = _fp16_trainer(tmp_path, "train.steps=4")
    resumed.restore(trainer.run_dir.last)
    assert resumed.scaler.get_scale() == 1024.0
