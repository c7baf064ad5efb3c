"""The precision policy under emulated TF32: the flow stays invertible, inference stays full float32."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb
from tf32 import cuda_flags, emulated_tf32, round_to_tf32

from glowtrain import flows, precision
from glowtrain.config import apply_overrides, load_config
from glowtrain.evaluation import evaluate
from glowtrain.flows import InvConv2d
from glowtrain.model import Glow
from glowtrain.sample import sample_images


def test_tf32_rounding_keeps_ten_mantissa_bits_rounding_to_nearest():
    one_ulp = 2.0**-10  # of numbers in [1, 2); twice that in [2, 4)
    values = torch.tensor([1.0, 1 + one_ulp * 0.49, 1 + one_ulp * 0.51, 1 + one_ulp * 1.5, -3.0 - one_ulp * 1.02])
    rounded = round_to_tf32(values)
    assert rounded.tolist() == [1.0, 1.0, 1 + one_ulp, 1 + 2 * one_ulp, -3.0 - 2 * one_ulp]
    x = torch.randn(1000)
    assert ((round_to_tf32(x) - x).abs() <= x.abs() * 2.0**-11).all()


def test_the_emulation_follows_the_flags_read_at_call_time(monkeypatch):
    x, w = torch.randn(2, 8, 5, 5), torch.randn(4, 8, 3, 3)
    exact = F.conv2d(x, w)
    with emulated_tf32(monkeypatch) as calls:
        with cuda_flags(True):
            rounded = F.conv2d(x, w)
            product = torch.matmul(x.flatten(1), x.flatten(1).T)
        with cuda_flags(False):
            unrounded = F.conv2d(x, w)
    assert torch.equal(unrounded, exact) and not torch.equal(rounded, exact)
    assert torch.allclose(rounded, F.conv2d(round_to_tf32(x), round_to_tf32(w)), atol=1e-5)
    assert not torch.equal(product, torch.matmul(x.flatten(1), x.flatten(1).T))
    assert calls == {"rounded": 2, "exact": 1}


@pytest.mark.parametrize("lu", [True, False])
def test_the_invertible_1x1_convolution_ignores_tf32(monkeypatch, lu):
    conv = InvConv2d(12, lu=lu)
    perturb(conv, 0.2)
    x = torch.randn(3, 12, 6, 6)
    with emulated_tf32(monkeypatch) as calls:
        with cuda_flags(False):
            y_exact, rebuilt_exact = conv(x)[0], conv.reverse(conv(x)[0])
        with cuda_flags(True):
            y_tf32, rebuilt_tf32 = conv(x)[0], conv.reverse(conv(x)[0])
    assert calls["exact"] > 0  # the product went through an emulated operator (in float64, so never rounded)
    assert torch.equal(y_tf32, y_exact) and torch.equal(rebuilt_tf32, rebuilt_exact)
    assert (rebuilt_tf32 - x).abs().max() < 1e-5


def _rounding_invconv(weight, x):
    """What InvConv2d did before the policy: a float32 convolution, which CUDA runs in TF32."""
    return F.conv2d(x, weight.to(x.dtype)[:, :, None, None])


@pytest.fixture(scope="module")
def paper_model():
    """The paper's CIFAR-10 model (3x32x32, L=3, K=32, width 512), moved off its identity-like init."""
    torch.manual_seed(0)
    model = Glow((3, 32, 32), n_levels=3, n_steps=32, hidden_channels=512)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) - 0.5
    model.initialize(x)
    perturb(model, 0.001, seed=1)
    return model.eval(), x


def _round_trip_and_drift(model, x) -> tuple[float, float]:
    with torch.no_grad():
        zs, _ = model.encode(x)
        return float((model.decode(zs) - x).abs().max()), max(model.reconstruction_errors(x))


def test_paper_model_stays_invertible_with_tf32_coupling_networks(monkeypatch, paper_model):
    model, x = paper_model
    with emulated_tf32(monkeypatch) as calls, cuda_flags(True):
        round_trip, drift = _round_trip_and_drift(model, x)
        monkeypatch.setattr(flows, "mix_channels", _rounding_invconv)
        round_trip_before, drift_before = _round_trip_and_drift(model, x)
    assert calls["rounded"] > 0  # the coupling networks did run in (emulated) TF32
    assert round_trip <= 1e-3 and drift <= 1e-3, (round_trip, drift)
    # The same check fails when TF32 reaches the 1x1 convolutions: it would catch that regression.
    assert round_trip_before > 1e-3 or drift_before > 1e-3, (round_trip_before, drift_before)


def test_paper_model_in_full_float32_round_trips_to_float32_accuracy(monkeypatch, paper_model):
    model, x = paper_model
    with emulated_tf32(monkeypatch), cuda_flags(True), precision.full_float32():
        round_trip, drift = _round_trip_and_drift(model, x)
    assert round_trip < 2e-5 and drift < 1e-4, (round_trip, drift)


def test_evaluation_and_sampling_run_in_full_float32_whatever_the_flags(monkeypatch):
    cfg = apply_overrides(load_config(), ["model.n_levels=2", "model.n_steps=2", "model.hidden_channels=16",
                                          "train.eval_batch_size=300"])
    from glowtrain.data import build_dataset

    test_set = build_dataset(cfg.data, "test")
    torch.manual_seed(0)
    model = Glow(cfg.image_shape, n_levels=2, n_steps=2, hidden_channels=16)
    model.initialize(torch.rand(32, *cfg.image_shape) - 0.5)
    perturb(model, 0.05)
    results = []
    with emulated_tf32(monkeypatch) as calls:
        for tf32 in (False, True):
            with cuda_flags(tf32):
                bpd = evaluate(model, test_set, cfg, torch.device("cpu"))["bpd"]
                images = sample_images(model, 8, 0.7, cfg.data.n_bits, torch.Generator().manual_seed(0))
                results.append((bpd, images))
                # and the flags come back as they were
                assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
                assert torch.backends.cudnn.allow_tf32 is tf32
    assert calls["rounded"] == 0 and calls["exact"] > 0
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


@pytest.fixture
def restore_math():
    saved = precision.settings()
    yield
    precision.restore(saved)


@pytest.mark.parametrize("tf32", [True, False])
def test_configure_sets_tf32_and_autotuning_for_cuda(restore_math, tf32):
    precision.configure(torch.device("cuda"), tf32=tf32)
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_mode_turns_off_autotuning_and_fixes_the_cublas_workspace(restore_math, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    precision.configure(torch.device("cuda"), deterministic=True)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    precision.configure(torch.device("cpu"), deterministic=False)  # the next run's settings replace these
    assert not torch.are_deterministic_algorithms_enabled()


def test_commands_other_than_fit_leave_a_users_deterministic_setting_alone(restore_math, monkeypatch):
    from glowtrain.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    resolve_device("cpu")
    resolve_device("cuda")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark


def test_cpu_leaves_the_cuda_flags_alone(restore_math):
    torch.set_float32_matmul_precision("highest")
    precision.configure(torch.device("cpu"), tf32=True)
    assert torch.get_float32_matmul_precision() == "highest"


def test_a_deterministic_run_uses_deterministic_kernels_and_train_restores_the_settings_after(restore_math, tmp_path):
    """On the CPU this shows that every op of a run has a deterministic kernel there; the bit-exact resume
    it buys on CUDA was measured on an H200 (README, GPUs)."""
    from glowtrain.train import Trainer, train

    seen = []

    class Watching(Trainer):
        def prepare_batch(self, images, labels):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().prepare_batch(images, labels)

    cfg = apply_overrides(load_config(), [
        "run.device=cpu", "run.deterministic=true", "model.n_levels=2", "model.n_steps=2",
        "model.hidden_channels=8", "train.batch_size=16", "train.init_batch_size=32", "train.eval_batch_size=300",
        "train.steps=4", "train.log_every=2", "train.eval_every=2", "train.sample_every=4",
        "train.checkpoint_every=2", "train.n_samples=1", "train.sample_temperatures=[0.7]"])
    torch.set_float32_matmul_precision("medium")
    train(cfg, out=str(tmp_path / "run"), progress=False, trainer=Watching)
    assert seen == [True] * 4
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert torch.get_float32_matmul_precision() == "medium"
