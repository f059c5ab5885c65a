"""byol.py: the loss against a loop transcription, the heads, the EMA update, one training step in-process (target
frozen, outside DDP, equal to the hand-computed mix), and one 2-rank launch (smoke, log, export) resumed
bit-exactly on the gloo pool."""
import math
import os

import pytest
import torch
import torch.nn as nn

import byol
from byol import byol_loss
from common import config, schedules
from helpers import (assert_ema_update_mixes, assert_one_step_updates_the_frozen_teacher, assert_same_tensors,
                     copy_epoch_1, launch, load_ckpt, read_log, run_script, tiny_args)


# ----- the loss against a naive loop (float64) -----

def naive_byol(p, z):
    """BYOL Eq. 2 written out: mean_i || p_i/|p_i| - z_i/|z_i| ||^2."""
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(p.shape[0])) / p.shape[0]


@pytest.mark.parametrize("n", [1, 7])
def test_byol_loss_matches_reference(n):
    torch.manual_seed(n)
    p = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    ours = byol_loss(p, z)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, naive_byol(p, z.detach()), rtol=0, atol=1e-6)
    ref_grad, = torch.autograd.grad(naive_byol(p, z.detach()), p)
    ours.backward()
    torch.testing.assert_close(p.grad, ref_grad, rtol=0, atol=1e-6)
    assert z.grad is None  # stop-gradient on the target projection
    # Analytic: identical directions give 0, opposite ones 4, and the scale does not matter.
    x = torch.randn(3, 6, dtype=torch.float64)
    assert float(byol_loss(x, 5 * x)) == pytest.approx(0.0, abs=1e-12)
    assert float(byol_loss(x, -x)) == pytest.approx(4.0, abs=1e-12)


# ----- heads, EMA update -----

def tiny_cfg(arch, *extra):
    return config.parse(byol.Config, tiny_args("unused", "unused", "--arch", arch, "--patch_size", "8",
                                               "--pred_hidden_dim", "48", *extra))


def head_summary(head):
    """(number of Linear layers, last module, bias of the last Linear)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    return len(linears), head[-1], linears[-1].bias is not None


@pytest.mark.parametrize("arch", ["resnet18", "vit_debug"])
def test_heads_follow_the_paper(arch):
    vit = arch == "vit_debug"
    model = byol.build_model(tiny_cfg(arch), 32)
    for head in (model.projector, model.predictor):  # BYOL / SD-BYOL: no output BN, a last Linear without bias
        layers, last, bias = head_summary(head)  # (BYOL networks.py: hk.Linear(output_size, with_bias=False))
        assert isinstance(last, nn.Linear) and not bias
    assert head_summary(model.projector)[0] == (3 if vit else 2) and head_summary(model.predictor)[0] == 2


def test_ema_update_is_the_hand_computed_mix():
    torch.manual_seed(0)
    model = byol.build_model(tiny_cfg("vit_debug"), 32)
    assert_ema_update_mixes(model, byol.build_target(model), byol.ema_update)


def test_one_step_updates_the_frozen_teacher_after_the_optimizer(process_group, image_folder):
    """vit_debug (ResNets: the 2-rank launch). BYOL uses tau(0) after step 0, the step just taken (MoCo v3: m(1),
    tests/test_mocov3.py)."""
    m = schedules.ema_momentum(0, 2, 0.5)
    assert m == pytest.approx(0.5, abs=1e-12)
    assert_one_step_updates_the_frozen_teacher(byol, byol.build_target, tiny_cfg, m, process_group, image_folder)


# ----- one 2-rank launch: smoke, log, export; resumed on the pool -----

EXTRA = ("--pred_hidden_dim", "64", "--save_every", "1")


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """2 ranks, 2 epochs of the tiny preset (resnet8), k-NN after the last, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("byol") / "straight")
    launch("byol.py", tiny_args(image_folder, out, *EXTRA, "--eval_every", "2"))
    return out


@pytest.mark.e2e
def test_smoke_two_ranks_log_and_export(run):
    """Log, k-NN on the target, the online backbone exported (its torchvision load as a CIFAR-stem ResNet-18:
    tests/common/test_checkpoint.py)."""
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert "knn_top1" in rows[-1] and 0.0 <= rows[-1]["loss"] <= 8.0  # two terms of 2 - 2cos, each in [0, 4]
    blob = load_ckpt(run)
    assert blob["epoch"] == 2 and blob["step"] == 4 and {"model", "teacher", "optimizer", "scaler"} <= blob.keys()
    assert sorted({k.split(".")[0] for k in blob["teacher"]}) == ["backbone", "projector"]  # no module. prefix
    exported = torch.load(os.path.join(run, "backbone.pt"), weights_only=True)
    assert_same_tensors(exported, {k[9:]: v for k, v in blob["model"].items() if k.startswith("backbone.")})


@pytest.mark.e2e
def test_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool): the same online network, target,
    optimizer and scaler state."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "byol", tiny_args(image_folder, resumed, *EXTRA, "--eval_every", "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "teacher", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert read_log(resumed)[0]["epoch"] == 1
