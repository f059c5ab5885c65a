"""mocov3.py and byol.py: losses against naive references, 2 ranks vs 1 process, heads, momentum schedule, EMA
update, one training step in-process (teacher frozen, outside DDP, equal to the hand-computed mix), 2-rank
torchrun smoke runs and bit-exact resume of mocov3.py (student, teacher and optimizer)."""
import math
import os
import shutil

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import byol
import mocov3
from byol import byol_loss
from common import augment, config, data, dist, optim, schedules
from conftest import assert_same_tensors, launch, load_ckpt, read_log, tiny_args
from mocov3 import mocov3_loss

SCRIPTS = {"mocov3": mocov3, "byol": byol}
N, D_IN, D_OUT = 6, 5, 4  # 2-rank test: per-rank batch 3


# ----- losses against naive loops (float64) -----

def naive_ctr(q, k, tau):
    """MoCo v3 Eq. 1 written out, times 2 tau: for query i, -log(exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau))."""
    total = 0.0
    for i in range(q.shape[0]):
        sims = [F.cosine_similarity(q[i], k[j], dim=0) / tau for j in range(k.shape[0])]
        total = total - torch.log(torch.exp(sims[i]) / sum(torch.exp(s) for s in sims))
    return total / q.shape[0] * 2 * tau


def naive_byol(p, z):
    """BYOL Eq. 2 written out: mean_i || p_i/|p_i| - z_i/|z_i| ||^2."""
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(p.shape[0])) / p.shape[0]


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


# ----- 2 gloo ranks vs one process for mocov3_loss -----

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


def _worker(rank, tmp):
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    x1, x2 = make_inputs()
    part = slice(rank * N // 2, (rank + 1) * N // 2)
    q_net, k_net = make_nets()
    q_ddp = dist.ddp(q_net, dist.Context(rank, rank, 2, torch.device("cpu")))  # kept alive until backward
    loss = symmetric_loss(q_ddp, k_net, x1[part], x2[part])
    loss.backward()
    torch.save({"grad": [p.grad for p in q_net.parameters()], "loss": loss.detach()}, f"{tmp}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_mocov3_loss_two_ranks_equal_one_process(process_group, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    x1, x2 = make_inputs()
    q_net, k_net = make_nets()
    loss = symmetric_loss(q_net, k_net, x1, x2)  # one process, whole batch: every key is a negative
    loss.backward()
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for out in outs:  # keys gathered without gradient + DDP's average = the full-batch gradient
        for ours, full in zip(out["grad"], q_net.parameters()):
            torch.testing.assert_close(ours, full.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((outs[0]["loss"] + outs[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)


# ----- heads, momentum schedule, EMA update -----

def tiny_cfg(script, arch, *extra):
    return config.parse(SCRIPTS[script].Config, tiny_args("unused", "unused", "--arch", arch, "--patch_size", "8",
                                                          "--pred_hidden_dim", "48", *extra))


def head_summary(head):
    """(number of Linear layers, last module, bias of the last Linear)."""
    linears = [m for m in head if isinstance(m, nn.Linear)]
    return len(linears), head[-1], linears[-1].bias is not None


@pytest.mark.parametrize("arch", ["resnet18", "vit_debug"])
def test_heads_follow_the_papers(arch):
    vit = arch == "vit_debug"
    model = mocov3.build_model(tiny_cfg("mocov3", arch), 32)
    layers, last, bias = head_summary(model.projector)  # MoCo v3: ViT 3 layers, ResNet 2, both with a last BN
    assert layers == (3 if vit else 2) and isinstance(last, nn.BatchNorm1d) and not last.affine and not bias
    layers, last, bias = head_summary(model.predictor)  # 2 layers, last BN for ViT only
    assert layers == 2 and isinstance(last, nn.BatchNorm1d) == vit and not bias
    assert model.predictor[0].in_features == 32 and model.predictor[0].out_features == 48
    model = byol.build_model(tiny_cfg("byol", arch), 32)
    for head in (model.projector, model.predictor):  # BYOL / SD-BYOL: no output BN, a last Linear without bias
        layers, last, bias = head_summary(head)  # (BYOL networks.py: hk.Linear(output_size, with_bias=False))
        assert isinstance(last, nn.Linear) and not bias
    assert head_summary(model.projector)[0] == (3 if vit else 2) and head_summary(model.predictor)[0] == 2


def test_momentum_schedule_endpoints():
    for m0 in (0.99, 0.996):
        assert schedules.ema_momentum(0, 1000, m0) == pytest.approx(m0, abs=1e-12)
        assert schedules.ema_momentum(500, 1000, m0) == pytest.approx((1 + m0) / 2, abs=1e-12)
        assert schedules.ema_momentum(1000, 1000, m0) == 1.0
    values = [schedules.ema_momentum(t, 100, 0.99) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("script", ["mocov3", "byol"])
def test_ema_update_is_the_hand_computed_mix(script):
    mod = SCRIPTS[script]
    torch.manual_seed(0)
    model = mod.build_model(tiny_cfg(script, "vit_debug"), 32)
    teacher = {"mocov3": mocov3.build_momentum_encoder, "byol": byol.build_target}[script](model)
    assert not any(k.startswith("predictor") for k in teacher.state_dict())  # backbone + projector only
    with torch.no_grad():  # a teacher that differs from the student, so the mix is visible
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p))
    before = {k: v.clone().double() for k, v in teacher.named_parameters()}
    online = {k: v.detach().double() for k, v in model.named_parameters()}
    mod.ema_update(teacher, model, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.double(), 0.9 * before[name] + 0.1 * online[name], rtol=0, atol=1e-6)


# ----- one training step in-process: the teacher after the step, and that it never got a gradient -----

@pytest.mark.parametrize("script, arch", [("mocov3", "vit_debug"), ("byol", "vit_debug")])  # ResNets: torchrun tests
def test_one_step_updates_the_frozen_teacher_after_the_optimizer(process_group, image_folder, tmp_path, script, arch):
    mod, ctx = SCRIPTS[script], process_group
    # sgd with a large lr and m0 0.5 so that the student moves and the mix is far from both endpoints.
    cfg = tiny_cfg(script, arch, "--optimizer", "sgd", "--lr", "30", "--warmup_epochs", "0",
                   "--base_momentum", "0.5", "--max_steps_per_epoch", "1")
    views = augment.ViewMaker(mod.view_recipes(cfg, 32), 2, ctx.device, "cpu", "imagefolder")
    dataset = data.build_dataset("imagefolder", image_folder, "pretrain", views.transform)
    loader = data.train_loader(dataset, 8, ctx, 0, cfg.seed)
    torch.manual_seed(0)
    model = mod.build_model(cfg, 32)
    model_ddp = dist.ddp(model, ctx)
    teacher = {"mocov3": mocov3.build_momentum_encoder, "byol": byol.build_target}[script](model)
    optimizer = optim.build_optimizer("sgd", optim.param_groups(model, cfg.weight_decay), lr=0.0)
    theta0 = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    step, row = mod.train_one_epoch(model_ddp, views, model, teacher, loader, optimizer,
                                    optim.grad_scaler("none", ctx.device), cfg, ctx, 0, 0, 2)
    assert step == 1 and math.isfinite(row["loss"])
    assert not isinstance(teacher, nn.parallel.DistributedDataParallel)
    assert not any(isinstance(m, nn.parallel.DistributedDataParallel) for m in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # MoCo v3: the update after step 0 prepares the keys of step 1, so it uses m(1); BYOL uses tau(0) (step k).
    m = schedules.ema_momentum(1 if script == "mocov3" else 0, 2, 0.5)
    assert m == pytest.approx(0.75 if script == "mocov3" else 0.5, abs=1e-12)
    moved = 0.0
    for name, p in teacher.named_parameters():
        theta1 = dict(model.named_parameters())[name].detach().double()
        torch.testing.assert_close(p.double(), m * theta0[name] + (1 - m) * theta1, rtol=0, atol=1e-6)
        moved = max(moved, float((p.double() - theta0[name]).abs().max()))
    assert moved > 1e-3  # the check above is not trivially satisfied by an unchanged teacher


# ----- end to end under torchrun -----

def test_mocov3_smoke_and_bit_exact_resume(image_folder, tmp_path):
    """2 ranks, 2 epochs: log, k-NN on the momentum encoder, online export; then the epoch-1 checkpoint of that run
    relaunched must end with the same student, momentum encoder and optimizer state."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    extra = ("--pred_hidden_dim", "64", "--save_every", "1", "--warmup_epochs", "0")  # lr > 0 from step 0
    launch("mocov3.py", tiny_args(image_folder, straight, *extra, "--eval_every", "2"))
    rows = read_log(straight)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert "knn_top1" in rows[-1] and rows[-1]["momentum"] == 1.0  # m(T) = 1 after the last step
    blob = load_ckpt(straight)
    assert blob["epoch"] == 2 and blob["step"] == 4
    assert {"model", "teacher", "optimizer", "scaler"} <= blob.keys()
    assert not any(k.startswith(("module.", "predictor")) for k in blob["teacher"])
    # backbone.pt is the base encoder's backbone (not the momentum encoder's).
    exported = torch.load(os.path.join(straight, "backbone.pt"), weights_only=True)
    assert_same_tensors(exported, {k[9:]: v for k, v in blob["model"].items() if k.startswith("backbone.")})

    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))
    run = launch("mocov3.py", tiny_args(image_folder, resumed, *extra, "--eval_every", "0"))
    assert "resumed from" in run.stdout and "at epoch 1" in run.stdout
    a, b = load_ckpt(straight), load_ckpt(resumed)
    for key in ("model", "teacher", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert read_log(resumed)[0]["epoch"] == 1


def test_byol_smoke_two_ranks(image_folder, tmp_path):
    """2 ranks, ResNet-18 (tiny preset): log, k-NN on the target, the online backbone exported for torchvision."""
    out = str(tmp_path / "run")
    launch("byol.py", tiny_args(image_folder, out, "--pred_hidden_dim", "64", "--eval_every", "2"))
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert "knn_top1" in rows[-1] and 0.0 <= rows[-1]["loss"] <= 8.0  # two terms of 2 - 2cos, each in [0, 4]
    blob = load_ckpt(out)
    assert blob["epoch"] == 2 and blob["step"] == 4 and {"model", "teacher", "optimizer", "scaler"} <= blob.keys()
    assert sorted({k.split(".")[0] for k in blob["teacher"]}) == ["backbone", "projector"]  # no module. prefix
    exported = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    assert_same_tensors(exported, {k[9:]: v for k, v in blob["model"].items() if k.startswith("backbone.")})
    tv = torchvision.models.resnet18()  # with the CIFAR stem
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = tv.load_state_dict(exported, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
