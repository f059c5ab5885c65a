"""msbreg.py: each loss term against a loop reference in float64 (value and gradient), Eq. 7 and the pairwise form
of Eq. 3, the Brownian noise, singular_value_loss on 2 gloo ranks (the pool) vs one process, and a 2-rank K = 4
launch (smoke, log) resumed bit-exactly on the pool."""
import os
import sys

import pytest
import torch
import torch.nn as nn

from common import config, dist
from helpers import ROOT, assert_same_tensors, copy_epoch_1, launch, load_ckpt, read_log, run_script, tiny_args
from msbreg import (brownian_loss, brownian_noise, centroid_loss, cross_view_loss, ema_update, msbreg_loss,
                    singular_value_loss)

K, B, D = 3, 5, 4  # views, images, embedding dimension


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(K, B, D, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(K, B, D, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.randn(B, D, generator=g, dtype=torch.float64).expand(K, B, D)
    return p, z, n


def unit(v):
    return v / v.norm()


# ----- loop references, written from the equations one vector at a time -----

def ref_centroid(p, z):  # Eq. 3, averaged over images
    total = 0.0
    for b in range(B):
        c = sum(unit(z[l, b].detach()) for l in range(K)) / K
        for j in range(K):
            total = total + ((unit(p[j, b]) - c) ** 2).sum() / K
    return total / B


def ref_singular_value(p):  # Eq. 5 and 6
    total = 0.0
    for j in range(K):
        mean = sum(p[j, i] for i in range(B)) / B
        cov = sum(torch.outer(p[j, i] - mean, p[j, i] - mean) for i in range(B)) / (B - 1)
        for a in range(D):
            for c in range(D):
                total = total + (cov[a, c] - (1.0 if a == c else 0.0)) ** 2 / K
    return total


def ref_brownian(p, n):  # Eq. 4, averaged over images
    return sum(torch.dot(unit(n[j, b]), unit(p[j, b])) for j in range(K) for b in range(B)) / (K * B)


def value_and_grad(fn, p, *args):
    p = p.detach().clone().requires_grad_(True)
    value = fn(p, *args)
    value.backward()
    return value.detach(), p.grad


@pytest.mark.parametrize("term", ["centroid", "singular_value", "brownian"])
def test_term_matches_loop_reference(process_group, term):
    p, z, n = make_inputs()
    fn, ref, extra = {"centroid": (centroid_loss, ref_centroid, (z,)),
                      "singular_value": (singular_value_loss, ref_singular_value, ()),
                      "brownian": (brownian_loss, ref_brownian, (n,))}[term]
    value, grad = value_and_grad(fn, p, *extra)
    ref_value, ref_grad = value_and_grad(ref, p, *extra)
    assert value.dtype == torch.float64 and value.shape == ()
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)


def test_singular_value_loss_is_the_sum_over_singular_values(process_group):
    """Eq. 7: ||S_j - I||_F^2 = sum_i (sigma_ij - 1)^2, sigma_ij the singular values of S_j."""
    p = make_inputs(1)[0].detach()
    centred = p - p.mean(dim=1, keepdim=True)
    sigma = torch.linalg.svdvals(centred.transpose(1, 2) @ centred / (B - 1))  # (K, D)
    torch.testing.assert_close(singular_value_loss(p), (sigma - 1).pow(2).sum(dim=1).mean(), rtol=0, atol=1e-9)
    # A whitened batch (covariance exactly I) has zero loss.
    x = torch.randn(8, D, dtype=torch.float64)
    x = x - x.mean(0)
    white = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T)).T)  # x L^-T: covariance L^-1 C L^-T = I
    assert singular_value_loss(white.expand(2, 8, D)) < 1e-12


def test_centroid_loss_is_the_pairwise_form():
    """Sec. 3.2: Eq. 3 equals the mean over all K^2 pairs of ||p^_j - z^'_l||^2 minus the target views' spread
    around their centroid, a constant of the target, so both have the same gradient; z gets none (stop-gradient)."""
    p, z, _ = make_inputs(2)
    ph, zh = p / p.norm(dim=-1, keepdim=True), (z / z.norm(dim=-1, keepdim=True)).detach()
    pairwise = (ph[:, None] - zh[None]).pow(2).sum(-1).mean(dim=(0, 1))  # (B,): mean over (j, l)
    spread = (zh - zh.mean(0)).pow(2).sum(-1).mean(0)  # (B,)
    value, grad = value_and_grad(centroid_loss, p, z)
    torch.testing.assert_close(value, (pairwise - spread).mean().detach(), rtol=0, atol=1e-9)
    _, pair_grad = value_and_grad(lambda q: (q / q.norm(dim=-1, keepdim=True))[:, None].sub(zh[None]).pow(2)
                                  .sum(-1).mean(), p)
    torch.testing.assert_close(grad, pair_grad, rtol=0, atol=1e-9)
    centroid_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_analytic_cases_and_cross_view_form():
    p, z, n = make_inputs(3)
    same = p.detach()[:1].expand(K, B, D)
    assert centroid_loss(same, 2.5 * same) < 1e-12  # every view identical and aligned with the target
    torch.testing.assert_close(brownian_loss(-3.0 * n, n), torch.tensor(-1.0, dtype=torch.float64))
    # For K = 2 the cross-view form is BYOL's symmetrised loss (2 - 2cos(p1, z2)) + (2 - 2cos(p2, z1)), and the
    # leave-one-out centroid is half of it.
    cos = nn.functional.cosine_similarity
    byol = (2 - 2 * cos(p[0], z[1], dim=-1)).mean() + (2 - 2 * cos(p[1], z[0], dim=-1)).mean()
    torch.testing.assert_close(cross_view_loss(p[:2], z[:2]), byol)
    torch.testing.assert_close(centroid_loss(p[:2], z[:2], leave_one_out=True), byol / 2)


def test_msbreg_loss_combines_the_terms(process_group):
    p, z, n = make_inputs(4)
    loss, parts = msbreg_loss(p, z, n, lambda_s=0.01, lambda_b=0.3)
    torch.testing.assert_close(loss, centroid_loss(p, z) + 0.01 * singular_value_loss(p) + 0.3 * brownian_loss(p, n))
    assert parts["loss_c"] == centroid_loss(p, z) and not parts["loss_s"].requires_grad
    no_c, _ = msbreg_loss(p, z, n, lambda_s=0.0, lambda_b=0.0, centroid="none")
    torch.testing.assert_close(no_c, cross_view_loss(p, z))
    others, _ = msbreg_loss(p, z, n, lambda_s=0.0, lambda_b=0.0, centroid="others")
    torch.testing.assert_close(others, centroid_loss(p, z, leave_one_out=True))


def ref_leave_one_out(p, z):  # Eq. 3 with view j's centroid taken over the other K - 1 target views
    total = 0.0
    for b in range(B):
        for j in range(K):
            c = sum(unit(z[l, b].detach()) for l in range(K) if l != j) / (K - 1)
            total = total + ((unit(p[j, b]) - c) ** 2).sum() / K
    return total / B


def ref_cross_view(p, z):  # sum over ordered pairs j != l of 2 - 2 cos(p_j, z_l), mean over images
    return sum(2 - 2 * torch.dot(unit(p[j, b]), unit(z[l, b].detach()))
               for b in range(B) for j in range(K) for l in range(K) if j != l) / B


@pytest.mark.parametrize("fn, ref", [(lambda p, z: centroid_loss(p, z, leave_one_out=True), ref_leave_one_out),
                                     (cross_view_loss, ref_cross_view)], ids=["leave_one_out", "cross_view"])
def test_centroid_options_match_loop_references(fn, ref):
    p, z, _ = make_inputs(6)
    value, grad = value_and_grad(fn, p, z)
    ref_value, ref_grad = value_and_grad(ref, p, z)
    torch.testing.assert_close(value, ref_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-6)


def test_brownian_noise_is_shared_by_the_views_of_an_image_only():
    torch.manual_seed(0)
    n = brownian_noise(4, 64, 16)
    assert n.shape == (4, 64, 16)
    for j in range(1, 4):
        assert torch.equal(n[j], n[0])  # the same direction for every view of an image
    cos = nn.functional.normalize(n[0], dim=1) @ nn.functional.normalize(n[0], dim=1).T  # (64, 64)
    assert cos.sub(torch.eye(64)).abs().max() < 0.99  # different images, different directions
    assert not torch.equal(brownian_noise(4, 64, 16), n)  # fresh every step
    torch.manual_seed(0)
    assert torch.equal(brownian_noise(4, 64, 16), n)  # from torch's RNG: reseeding reproduces it (resume)
    big = brownian_noise(1, 20000, 8)
    assert big.mean().abs() < 0.02 and (big.std() - 1).abs() < 0.02  # N(0, I)


def test_ema_update():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = target.weight.detach().clone()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * online.weight.detach())


# ----- distributed: L_s over the global batch -----

N, D_IN = 6, 5  # global batch, input width; per-rank batch 3 x 2 ranks


def make_batch_and_model():
    torch.manual_seed(1)
    x = torch.randn(K, N, D_IN, dtype=torch.float64)
    return x, nn.Linear(D_IN, D).double()


def _two_rank_step():
    """On each pool rank: its half of the batch through DDP, L_s over the global batch, backward."""
    ctx = dist.setup("cpu")
    x, model = make_batch_and_model()
    model_ddp = dist.ddp(model, ctx)
    loss = singular_value_loss(model_ddp(x[:, ctx.rank * N // 2:(ctx.rank + 1) * N // 2]))  # (K, N/2, D) per rank
    loss.backward()
    return {"grad": [p.grad for p in model.parameters()], "loss": loss.detach()}


def test_singular_value_loss_two_ranks_equal_one_process(process_group, gloo_pool):
    outs = gloo_pool.run(_two_rank_step)
    x, model = make_batch_and_model()
    full = singular_value_loss(model(x))  # one process, the whole batch
    full.backward()
    for out in outs:
        torch.testing.assert_close(out["loss"], full.detach(), rtol=0, atol=1e-9)  # every rank: the global L_s
        for ours, ref in zip(out["grad"], model.parameters()):
            torch.testing.assert_close(ours, ref.grad, rtol=0, atol=1e-9)


# ----- end to end -----

@pytest.mark.parametrize("extra, message", [
    (["--num_views", "1"], "num_views must be at least 2"),
    (["--dataset", "fake", "--class_list", "LIST"], "class_list only applies to imagefolder/imagenet"),
    (["--class_list", "LIST"], "2 classes of the class list are not folders"),  # reaches build_dataset
])
def test_bad_input_is_one_clear_line(process_group, image_folder, tmp_path, monkeypatch, capsys, extra, message):
    import msbreg
    (tmp_path / "classes.txt").write_text("c0\nc1\nmissing_a\nmissing_b\n")
    extra = [str(tmp_path / "classes.txt") if a == "LIST" else a for a in extra]
    monkeypatch.setattr(sys, "argv", ["msbreg.py"] + tiny_args(image_folder, str(tmp_path / "out"), *extra))
    with pytest.raises(SystemExit) as exit_:
        config.run(msbreg.main)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


K4 = ("--num_views", "4", "--save_every", "1")


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """2 ranks (launched), K = 4 views, 2 epochs of the tiny preset (resnet8), a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("msbreg") / "straight")
    launch("msbreg.py", tiny_args(image_folder, out, *K4))
    return out


@pytest.mark.e2e
def test_two_ranks_k4_smoke_and_log(run):
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1] and "knn_top1_k5" in rows[-1]
    for r in rows:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("loss", "loss_c", "loss_s", "loss_b"))
        # unit vectors: mean per-dim std <= sqrt(n / (n - 1) / D), n = 4 images per rank, D = proj_dim 32
        assert 0 < r["embed_std"] <= (4 / 3 / 32) ** 0.5
    blob = load_ckpt(run)
    assert blob["epoch"] == 2 and blob["step"] == 4 and blob["config"]["num_views"] == 4
    assert set(blob["teacher"]) == {k for k in blob["model"] if not k.startswith("predictor.")}
    assert not torch.equal(blob["teacher"]["backbone.conv1.weight"], blob["model"]["backbone.conv1.weight"])


@pytest.mark.e2e
def test_k4_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool) for the 2nd epoch."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "msbreg", tiny_args(image_folder, resumed, *K4, "--eval_every", "0"))[0]
    assert "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for name in ("model", "teacher", "optimizer"):
        assert_same_tensors(a[name], b[name], name)


def test_k2_config_is_byol(process_group):
    """The paper: "the case of K = 2 is the same as BYOL setting" (Tables 8 and 11 share BYOL's 71.92). With the
    K = 2 config's flags and lambda_s = lambda_b = 0, the loss is BYOL's symmetrised loss, (2 - 2 cos(p1, sg z2)) +
    (2 - 2 cos(p2, sg z1)), in value and gradient: no cos(p1, z1) or cos(p2, z2) term, and not half of it."""
    import byol
    import msbreg
    path = os.path.join(ROOT, "configs", "msbreg", "imagenet100_resnet18_k2.yaml")
    cfg = config.parse(msbreg.Config, ["--config", path, "--lambda_s", "0", "--lambda_b", "0"])
    assert cfg.num_views == 2
    p, z, n = (t[:2] for t in make_inputs(5))
    ours, parts = msbreg_loss(p, z, n, cfg.lambda_s, cfg.lambda_b, cfg.centroid)
    ref = byol.byol_loss(p[0], z[1]) + byol.byol_loss(p[1], z[0])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, p)
    g_ref, = torch.autograd.grad(ref, p)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


def test_heads_are_byols():
    """Sec. 7.2's 2-layer heads on BYOL's MLP (networks.py): Linear -> BN (LN) -> ReLU -> Linear without bias."""
    import msbreg
    for norm in ("bn", "ln"):
        cfg = config.parse(msbreg.Config, ["--head_norm", norm])
        model = msbreg.build_model(cfg, 32)
        for head in (model.projector, model.predictor):
            kinds = [type(m).__name__ for m in head]
            assert kinds == ["Linear", "BatchNorm1d" if norm == "bn" else "LayerNorm", "ReLU", "Linear"]
            assert head[-1].bias is None and head[-1].out_features == 128
