"""simsiam_gsg.py: the GSG loss against the appendix's per-sample loop (ties included), the SimSiam loss,
stop-gradient, the per-rank partner shuffle, heads / optimizer groups / EMA, a 2-rank SimSiam-GSG run on the gloo
pool, and one 2-rank launch of BYOL-GSG (smoke, log) resumed bit-exactly on the pool."""
import math
import os
import sys

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

import simsiam_gsg
from common import config, optim
from common.config import ConfigError
from helpers import assert_same_tensors, copy_epoch_1, launch, load_ckpt, read_log, run_script, tiny_args
from simsiam_gsg import Config, build_model, ema_update, gsg_loss, param_groups, partner_views, simsiam_loss

NAMES = ("p11", "p12", "p21", "p22")


def algorithm_1_loop(p11, p12, p21, p22, z11, z12, z21, z22):
    """GSG appendix Alg. 1 written out sample by sample (the if/elif chain, 0.5 * l, then the mean)."""
    def D(p, z):  # negative cosine similarity with sg(z)
        return -F.cosine_similarity(p, z.detach(), dim=0)

    def d(a, b):  # Euclidean distance
        return torch.dist(a, b).item()

    loss = []
    for i in range(p11.shape[0]):
        d1121, d1122 = d(z11[i], z21[i]), d(z11[i], z22[i])
        d1221, d1222 = d(z12[i], z21[i]), d(z12[i], z22[i])
        m = min(d1121, d1122, d1221, d1222)
        if d1121 == m:
            l = D(p11[i], z12[i]) + D(p21[i], z22[i])
        elif d1122 == m:
            l = D(p11[i], z12[i]) + D(p22[i], z21[i])
        elif d1221 == m:
            l = D(p12[i], z11[i]) + D(p21[i], z22[i])
        elif d1222 == m:
            l = D(p12[i], z11[i]) + D(p22[i], z21[i])
        loss.append(0.5 * l)
    return sum(loss) / len(loss)


def tie_rows(kind, dim, g):
    """One sample's (z11, z12, z21, z22) with integer entries (exact float64 distances), built to tie:
    0: z21 = z22 (d1121 = d1122 minimal); 1: z11 = z12 (d1122 = d1222 minimal); 2: all equal; 3: d1121 = d1222
    minimal; 4: d1122 = d1221 minimal; 5: d1221 = d1222 minimal; 6: d1222 alone minimal; 7: random integers."""
    def ints(lo=-3, hi=4):
        return torch.randint(lo, hi, (dim,), generator=g).double()
    a, e = ints(), ints(-1, 2)
    e[0] = 1.0  # e != 0
    far = a + 20.0
    if kind == 0:
        return a, far, a + e, a + e
    if kind == 1:
        return a, a.clone(), far, a + e
    if kind == 2:
        return a, a.clone(), a.clone(), a.clone()
    if kind == 3:
        return a, far, a + e, far + e
    if kind == 4:
        return a, far, far + e, a + e
    if kind == 5:
        return far, a, a + e, a - e
    if kind == 6:
        return far, a, far - 5.0, a + e
    return ints(), ints(), ints(), ints()


def make_inputs(n, dim=8, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    if ties:
        rows = [tie_rows(i % 8, dim, g) for i in range(n)]
        zs = [torch.stack([r[j] for r in rows]) for j in range(4)]
    else:
        zs = [torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(4)]
    ps = [torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    return ps, [z.requires_grad_(True) for z in zs]


@pytest.mark.parametrize("ties", [True, False], ids=["integer-ties", "randn"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_gsg_loss_equals_algorithm_1_loop(n, ties):
    ps, zs = make_inputs(n, seed=n, ties=ties)
    ours = gsg_loss(*ps, *zs)
    ours_grads = torch.autograd.grad(ours, ps, allow_unused=True, materialize_grads=True)
    ref = algorithm_1_loop(*ps, *zs)
    ref_grads = torch.autograd.grad(ref, ps, allow_unused=True, materialize_grads=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for name, a, b in zip(NAMES, ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"gradient w.r.t. {name}")
    if n == 64:  # every branch of the if/elif chain is taken: each p gets gradient for some samples
        assert all(g.abs().sum(dim=1).gt(0).any() for g in ours_grads)
        # and each p gets none for the samples whose branch does not use it (hard selection, not a blend)
        assert all(g.abs().sum(dim=1).eq(0).any() for g in ours_grads)


@pytest.mark.parametrize("kind, predicted", [
    (0, ("p11", "p21")),  # z21 = z22: d1121 = d1122 < others: d1121 wins
    (1, ("p11", "p22")),  # z11 = z12: d1122 = d1222 < others: d1122 wins
    (2, ("p11", "p21")),  # all distances 0
    (3, ("p11", "p21")),  # d1121 = d1222 < others: d1121 wins
    (4, ("p11", "p22")),  # d1122 = d1221 < others: d1122 wins
    (5, ("p12", "p21")),  # d1221 = d1222 < others: d1221 wins
    (6, ("p12", "p22")),  # d1222 alone
])
def test_ties_go_to_the_first_minimum(kind, predicted):
    """Exact ties: the branch of the first minimum in Alg. 1's order, and exactly two predictors get gradient."""
    g = torch.Generator().manual_seed(kind)
    zs = [z[None] for z in tie_rows(kind, 8, g)]  # (1, 8) each
    ps = [torch.randn(1, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    loss = gsg_loss(*ps, *zs)
    grads = dict(zip(NAMES, torch.autograd.grad(loss, ps, allow_unused=True, materialize_grads=True)))
    assert {k for k, v in grads.items() if v.abs().sum() > 0} == set(predicted)
    sibling = {"p11": zs[1], "p12": zs[0], "p21": zs[3], "p22": zs[2]}  # the stop-gradient target of each p
    p = dict(zip(NAMES, ps))
    expected = -0.5 * sum(F.cosine_similarity(p[k], sibling[k], dim=1) for k in predicted).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)


def test_simsiam_loss_reference():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g, dtype=torch.float64)
    ref = -sum((p[i] / p[i].norm()) @ (z[i] / z[i].norm()) for i in range(5)) / 5
    torch.testing.assert_close(simsiam_loss(p, z), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(simsiam_loss(z, 3.0 * z), torch.tensor(-1.0, dtype=torch.float64))  # scale-free
    torch.testing.assert_close(simsiam_loss(z, -z), torch.tensor(1.0, dtype=torch.float64))
    assert simsiam_loss(p.float(), z.float()).dtype == torch.float32


def test_stop_gradient_stops():
    """No gradient reaches z (or what z was computed from); gradient does reach every p."""
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)  # "encoder" output that feeds the targets
    ps, _ = make_inputs(6, ties=False)
    zs = [w.sum() * torch.randn(6, 8, dtype=torch.float64) for _ in range(4)]  # targets with a graph back to w
    simsiam_loss(ps[0], zs[1]).backward(retain_graph=True)
    assert w.grad is None and ps[0].grad is not None and ps[0].grad.abs().sum() > 0
    gsg_loss(*ps, *zs).backward()
    assert w.grad is None
    leaf_ps, leaf_zs = make_inputs(7, ties=False)
    gsg_loss(*leaf_ps, *leaf_zs).backward()
    assert all(z.grad is None for z in leaf_zs)


def test_without_stop_gradient_the_target_gets_its_gradient(monkeypatch):
    """--stop_grad false (SimSiam Fig. 2's ablation): the gradient of -cos(p, z) reaches z, and equals autograd's
    gradient of the plain negative cosine; only SimSiam without GSG accepts it."""
    g = torch.Generator().manual_seed(0)
    p, z = (torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    simsiam_loss(p, z, stop_grad=False).backward()
    p2, z2 = p.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    (-(F.normalize(p2, dim=1) * F.normalize(z2, dim=1)).sum(1).mean()).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.grad, p2.grad, rtol=0, atol=1e-12)
    for flags in (["--stop_grad", "false"], ["--stop_grad", "false", "--gsg", "false", "--base", "byol"]):
        monkeypatch.setattr(sys, "argv", ["simsiam_gsg.py", "--device", "cpu", *flags])  # gsg defaults to true
        with pytest.raises(ConfigError, match="needs --base simsiam --gsg false"):
            simsiam_gsg.main()


def test_partner_shuffle_is_one_local_permutation(monkeypatch):
    """x11, x12 untouched; x21, x22 are the SAME permutation r of this rank's rows (two views of image r(i)); no
    collective is called, so a partner can never come from another rank (each rank sees only its own rows)."""
    for name in ("all_gather", "all_reduce", "broadcast", "all_to_all", "scatter", "gather", "send", "recv"):
        monkeypatch.setattr(tdist, name, lambda *a, **k: pytest.fail("partner_views used a collective"))
    n = 16
    tag = torch.arange(n).float()[:, None, None, None].expand(n, 3, 2, 2)  # every pixel of image i holds i
    views = [tag + 0.1 * v for v in range(4)]  # view v of image i holds i + 0.1 v
    torch.manual_seed(3)
    out, r = partner_views(views)
    assert out[0] is views[0] and out[1] is views[1]
    assert sorted(r.tolist()) == list(range(n)) and r.tolist() != list(range(n))
    torch.testing.assert_close(out[2][:, 0, 0, 0], r.float() + 0.2)
    torch.testing.assert_close(out[3][:, 0, 0, 0], r.float() + 0.3)
    torch.manual_seed(3)
    assert torch.equal(partner_views(views)[1], r)  # the global torch RNG: reseeded per epoch and rank


def test_heads_param_groups_and_ema():
    cfg = config.parse(Config, ["--config", "configs/simsiam_gsg/cifar10_resnet18_simsiam_gsg.yaml", "--fix_pred_lr",
                                "true"])
    model = build_model(cfg, 32)
    proj, pred = model.projector, model.predictor
    # C.2: 512 -> 2048 (BN, ReLU) -> 2048 (BN without affine); C.1 predictor 2048 -> 512 -> 2048 with bias, no BN
    assert [tuple(m.weight.shape) for m in proj if isinstance(m, torch.nn.Linear)] == [(2048, 512), (2048, 2048)]
    assert isinstance(proj[-1], torch.nn.BatchNorm1d) and not proj[-1].affine
    assert [tuple(m.weight.shape) for m in pred if isinstance(m, torch.nn.Linear)] == [(512, 2048), (2048, 512)]
    assert isinstance(pred[-1], torch.nn.Linear) and pred[-1].bias is not None
    assert model.backbone.conv1.kernel_size == (3, 3)  # CIFAR stem
    # SimSiam: wd on every parameter, the predictor keeps the peak lr while the rest follows the schedule
    opt = torch.optim.SGD(param_groups(model, cfg, peak_lr=0.06), lr=0.06, momentum=0.9)
    optim.set_lr_wd(opt, 0.001)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 5e-4 for g in opt.param_groups)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"decay": 0.001, "predictor_decay": 0.06}
    # EMA: target <- m target + (1 - m) online, parameters only
    target = build_model(cfg, 32)
    before = [t.clone() for t in target.parameters()]
    ema_update(target, model, 0.99)
    for t, b, o in zip(target.parameters(), before, model.parameters()):
        torch.testing.assert_close(t, 0.99 * b + 0.01 * o)


def test_two_ranks_simsiam_gsg(image_folder, gloo_pool, tmp_path):
    """SimSiam-GSG (4 views, online targets) for 2 epochs on 2 ranks (the gloo pool)."""
    out = str(tmp_path / "simsiam")
    gloo_pool.run(run_script, "simsiam_gsg", tiny_args(image_folder, out, "--base", "simsiam", "--gsg", "true"))
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and -1.0 <= r["loss"] <= 1.0 for r in rows)
    assert "knn_top1" in rows[-1] and "knn_top1_k200" in rows[-1]
    blob = load_ckpt(out)
    assert blob["epoch"] == 2 and blob["step"] == 4 and "teacher" not in blob
    assert os.path.exists(os.path.join(out, "backbone.pt"))


BYOL_GSG = ("--base", "byol", "--gsg", "true", "--save_every", "1")


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """BYOL-GSG, 2 ranks (launched), 2 epochs of the tiny preset (resnet8), a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("byol_gsg") / "straight")
    launch("simsiam_gsg.py", tiny_args(image_folder, out, *BYOL_GSG))
    return out


@pytest.mark.e2e
def test_two_ranks_byol_gsg_smoke_and_log(run):
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1] and "knn_top1_k200" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    blob = load_ckpt(run)
    # The target lags the online network (m = 0.99) but is not a copy of it.
    w = "backbone.conv1.weight"
    assert not torch.equal(blob["model"][w], blob["teacher"][w])
    assert (blob["model"][w] - blob["teacher"][w]).abs().max() < (blob["model"][w]).abs().max()


@pytest.mark.e2e
def test_byol_gsg_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """BYOL-GSG for 2 epochs straight vs. its epoch-1 checkpoint resumed on 2 ranks (the pool): identical online,
    target, optimizer."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "simsiam_gsg", tiny_args(image_folder, resumed, *BYOL_GSG, "--eval_every", "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "teacher", "optimizer"):
        assert_same_tensors(a[key], b[key], key)


def test_lr_schedule_cosine_per_epoch_or_constant():
    """SimSiam's cosine over epochs from lr x batch / 256, or that peak every epoch (claim 1c's protocol)."""
    base = ["--lr", "0.1", "--batch_size", "512", "--epochs", "4"]
    cosine = config.parse(Config, base)
    assert [simsiam_gsg.epoch_lr(cosine, e) for e in range(4)] == pytest.approx(
        [0.2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    constant = config.parse(Config, base + ["--lr_schedule", "constant"])
    assert [simsiam_gsg.epoch_lr(constant, e) for e in range(4)] == [0.2] * 4
