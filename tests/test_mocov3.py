"""mocov3.py: the loss against a loop transcription (and on 2 gloo ranks vs one process), the heads, the momentum
schedule, the EMA update, one training step in-process (teacher frozen, outside DDP, equal to the hand-computed mix),
and one 2-rank launch (smoke, log, export) resumed bit-exactly on the gloo pool (student, momentum encoder,
optimizer)."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mocov3
from common import config, dist, schedules
from helpers import (assert_ema_update_mixes, assert_one_step_updates_the_frozen_teacher, assert_same_tensors,
                     copy_epoch_1, launch, load_ckpt, read_log, run_script, tiny_args)
from mocov3 import mocov3_loss

N, D_IN, D_OUT = 6, 5, 4  # 2-rank test: per-rank batch 3


# ----- the loss against a naive loop (float64) -----

def naive_ctr(q, k, tau):
    """MoCo v3 Eq. 1 written out, times 2 tau: for query i, -log(exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau))."""
    total = 0.0
    for i in range(q.shape[0]):
        sims = [F.cosine_similarity(q[i], k[j], dim=0) / tau for j in range(k.shape[0])]
        total = total - torch.log(torch.exp(sims[i]) / sum(torch.exp(s) for s in sims))
    return total / q.shape[0] * 2 * tau


@pytest.mark.parametrize("n, tau", [(1, 0.2), (5, 0.2), (8, 1.0)])
def test_mocov3_loss_matches_reference(process_group, n, tau):
    torch.manual_seed(n)
    q = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    ours = mocov3_loss(q, k, tau)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, naive_ctr(q, k.detach(), tau), rtol=0, atol=1e-6)
    ref_grad, = torch.autograd.grad(naive_ctr(q, k.detach(), tau), q)
    ours.backward()
    torch.testing.assert_close(q.grad, ref_grad, rtol=0, atol=1e-6)
    assert k.grad is None  # stop-gradient: the keys belong to the momentum encoder


def test_mocov3_loss_analytic(process_group):
    # Orthogonal keys, q = k: logits are 1/tau on the diagonal and 0 elsewhere.
    k = torch.eye(4, dtype=torch.float64) * 3.0
    tau = 0.5
    expected = 2 * tau * -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 3))
    torch.testing.assert_close(mocov3_loss(k.clone(), k, tau), torch.tensor(expected, dtype=torch.float64))


# ----- 2 gloo ranks vs one process -----

def make_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)


def make_nets():
    torch.manual_seed(1)
    return nn.Linear(D_IN, D_OUT), nn.Linear(D_IN, D_OUT)  # query network (trained), key network


def symmetric_loss(q_net, k_net, x1, x2):
    q1, q2 = q_net(torch.cat([x1, x2])).chunk(2)  # (n, D) each
    with torch.no_grad():
        k1, k2 = k_net(x1), k_net(x2)
    return mocov3_loss(q1, k2, 0.2) + mocov3_loss(q2, k1, 0.2)


def _two_rank_step():
    """On each pool rank: its half of the batch through DDP, the symmetric loss, backward."""
    ctx = dist.setup("cpu")
    x1, x2 = make_inputs()
    part = slice(ctx.rank * N // 2, (ctx.rank + 1) * N // 2)
    q_net, k_net = make_nets()
    q_ddp = dist.ddp(q_net, ctx)  # kept alive until backward
    loss = symmetric_loss(q_ddp, k_net, x1[part], x2[part])
    loss.backward()
    return {"grad": [p.grad for p in q_net.parameters()], "loss": loss.detach()}


def test_mocov3_loss_two_ranks_equal_one_process(process_group, gloo_pool):
    outs = gloo_pool.run(_two_rank_step)
    x1, x2 = make_inputs()
    q_net, k_net = make_nets()
    loss = symmetric_loss(q_net, k_net, x1, x2)  # one process, whole batch: every key is a negative
    loss.backward()
    for out in outs:  # keys gathered without gradient + DDP's average = the full-batch gradient
        for ours, full in zip(out["grad"], q_net.parameters()):
            torch.testing.assert_close(ours, full.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((outs[0]["loss"] + outs[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)


# ----- heads, momentum schedule, EMA update -----

def tiny_cfg(arch, *extra):
    return config.parse(mocov3.Config, tiny_args("unused", "unused", "--arch", arch, "--patch_size", "8",
                                                 "--pred_hidden_dim", "48", *extra))


def head_summary(head):
    """(number of Linear layers, last module, bias of the last Linear)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    return len(linears), head[-1], linears[-1].bias is not None


@pytest.mark.parametrize("arch", ["resnet18", "vit_debug"])
def test_heads_follow_the_paper(arch):
    vit = arch == "vit_debug"
    model = mocov3.build_model(tiny_cfg(arch), 32)
    layers, last, bias = head_summary(model.projector)  # MoCo v3: ViT 3 layers, ResNet 2, both with a last BN
    assert layers == (3 if vit else 2) and isinstance(last, nn.BatchNorm1d) and not last.affine and not bias
    layers, last, bias = head_summary(model.predictor)  # 2 layers, last BN for ViT only
    assert layers == 2 and isinstance(last, nn.BatchNorm1d) == vit and not bias
    assert model.predictor[0].in_features == 32 and model.predictor[0].out_features == 48


def test_momentum_schedule_endpoints():
    for m0 in (0.99, 0.996):
        assert schedules.ema_momentum(0, 1000, m0) == pytest.approx(m0, abs=1e-12)
        assert schedules.ema_momentum(500, 1000, m0) == pytest.approx((1 + m0) / 2, abs=1e-12)
        assert schedules.ema_momentum(1000, 1000, m0) == 1.0
    values = [schedules.ema_momentum(t, 100, 0.99) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_ema_update_is_the_hand_computed_mix():
    torch.manual_seed(0)
    model = mocov3.build_model(tiny_cfg("vit_debug"), 32)
    assert_ema_update_mixes(model, mocov3.build_momentum_encoder(model), mocov3.ema_update)


# ----- one training step in-process: the teacher after the step, and that it never got a gradient -----

def test_one_step_updates_the_frozen_teacher_after_the_optimizer(process_group, image_folder):
    """vit_debug (ResNets: the 2-rank launch). MoCo v3: the update after step 0 prepares the keys of step 1, so it
    uses m(1) (BYOL: tau(0), tests/test_byol.py)."""
    m = schedules.ema_momentum(1, 2, 0.5)
    assert m == pytest.approx(0.75, abs=1e-12)
    assert_one_step_updates_the_frozen_teacher(mocov3, mocov3.build_momentum_encoder, tiny_cfg, m, process_group,
                                               image_folder)


# ----- one 2-rank launch: smoke, log, export; resumed on the pool -----

EXTRA = ("--pred_hidden_dim", "64", "--save_every", "1", "--warmup_epochs", "0")  # lr > 0 from step 0


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """2 ranks, 2 epochs of the tiny preset (resnet8), k-NN after the last, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("mocov3") / "straight")
    launch("mocov3.py", tiny_args(image_folder, out, *EXTRA, "--eval_every", "2"))
    return out


@pytest.mark.e2e
def test_smoke_two_ranks_log_and_export(run):
    """Log, k-NN on the momentum encoder, the momentum at its end value, the online backbone exported."""
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert "knn_top1" in rows[-1] and rows[-1]["momentum"] == 1.0  # m(T) = 1 after the last step
    blob = load_ckpt(run)
    assert blob["epoch"] == 2 and blob["step"] == 4
    assert {"model", "teacher", "optimizer", "scaler"} <= blob.keys()
    assert not any(k.startswith(("module.", "predictor")) for k in blob["teacher"])
    # backbone.pt is the base encoder's backbone (not the momentum encoder's).
    exported = torch.load(os.path.join(run, "backbone.pt"), weights_only=True)
    assert_same_tensors(exported, {k[9:]: v for k, v in blob["model"].items() if k.startswith("backbone.")})


@pytest.mark.e2e
def test_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool) must end with the same student,
    momentum encoder, optimizer and scaler state."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "mocov3", tiny_args(image_folder, resumed, *EXTRA, "--eval_every", "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "teacher", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert read_log(resumed)[0]["epoch"] == 1
