"""sdssl.py: the three L_ssl forms with num_layers, the batched heads, the schedules, the stop-gradients, and the
three frameworks on 2 ranks: SD-MoCo v3 launched as 2 processes (smoke, log, per-layer k-NN on its checkpoint) resumed
bit-exactly on the gloo pool, SD-BYOL and SD-SimCLR on the pool."""
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sdssl
from common import config, models, schedules
from helpers import assert_same_tensors, copy_epoch_1, launch, load_ckpt, read_log, run_script, tiny_args

TINY_HEADS = ["--arch", "vit_debug", "--patch_size", "8", "--proj_hidden_dim", "64", "--isd_hidden_dim", "32",
              "--pred_hidden_dim", "64", "--proj_dim", "32", "--num_heads", "2"]


def cfg_for(*flags):
    return config.parse(sdssl.Config, ["--image_size", "32"] + TINY_HEADS + list(flags))


# ----- the losses -----

def test_contrastive_loss_over_layers_is_the_mean_of_per_layer_losses(process_group):
    torch.manual_seed(0)
    q = torch.randn(3 * 5, 8, dtype=torch.float64)  # 3 layers x 5 images
    k = torch.randn(5, 8, dtype=torch.float64)
    per_layer = [sdssl.contrastive_loss(q[l * 5:(l + 1) * 5], k, 0.2) for l in range(3)]
    torch.testing.assert_close(sdssl.contrastive_loss(q, k, 0.2, num_layers=3), sum(per_layer) / 3, rtol=0, atol=1e-12)
    # ... and one layer is MoCo v3's 2 tau x InfoNCE, written out.
    qn, kn = F.normalize(q[:5], dim=1), F.normalize(k, dim=1)
    ref = sum(-torch.log_softmax(qn[i] @ kn.T / 0.2, 0)[i] for i in range(5)) / 5 * 0.4
    torch.testing.assert_close(per_layer[0], ref, rtol=0, atol=1e-12)


def test_regression_loss_over_layers(process_group):
    p, z = torch.randn(2 * 4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ref = sum(2 - 2 * F.cosine_similarity(p[l * 4 + i], z[i], dim=0) for l in range(2) for i in range(4)) / 8
    torch.testing.assert_close(sdssl.regression_loss(p, z, 2), ref, rtol=0, atol=1e-12)


def naive_nt_xent(q, z, tau, num_layers):
    """Anchor row r = (layer, view v, image i): positive z[other view, i], the same view's z[v, i] excluded."""
    n2 = z.shape[0]
    total = 0.0
    for r in range(q.shape[0]):
        j = r % n2
        pos, own = (j + n2 // 2) % n2, j
        sims = [F.cosine_similarity(q[r], z[c], dim=0) / tau for c in range(n2)]
        total = total - (sims[pos] - torch.logsumexp(torch.stack([s for c, s in enumerate(sims) if c != own]), 0))
    return total / q.shape[0]


@pytest.mark.parametrize("num_layers", [1, 3])
def test_nt_xent_loss_matches_reference(process_group, num_layers):
    torch.manual_seed(1)
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)  # 3 images x 2 views
    if num_layers == 1:  # the plain SimCLR loss: anchors = candidates = the final outputs, gradient through both
        ours, ref = sdssl.nt_xent_loss(z, z, 0.2), naive_nt_xent(z, z, 0.2, 1)
        wrt = [z]
    else:  # L_isd: intermediate anchors against the detached final outputs
        q = torch.randn(num_layers * 6, 5, dtype=torch.float64, requires_grad=True)
        ours, ref = sdssl.nt_xent_loss(q, z.detach(), 0.2, num_layers), naive_nt_xent(q, z.detach(), 0.2, num_layers)
        wrt = [q]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    for a, b in zip(torch.autograd.grad(ours, wrt), torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_no_gradient_reaches_the_targets(process_group):
    q = torch.randn(2 * 4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    for loss in (sdssl.contrastive_loss(q, z, 0.2, 2), sdssl.regression_loss(q, z, 2)):
        gq, gz = torch.autograd.grad(loss, [q, z], allow_unused=True)
        assert gq is not None and gq.abs().sum() > 0 and gz is None


# ----- heads -----

@pytest.mark.parametrize("groups", [1, 2])
def test_batched_heads_equal_a_loop_of_separate_heads(groups):
    """One batched pass over `groups` blocks of rows (the views) = each head applied to each block separately
    (BN statistics per block), in value and in the gradients of the inputs and weights."""
    torch.manual_seed(0)
    heads, n = 3, 6
    batched = models.BatchedMLP(heads, 8, 16, 4, num_layers=3, last_norm=True).double()
    loop = [models.mlp(8, 16, 4, 3, last_norm=True).double() for _ in range(heads)]
    with torch.no_grad():
        for h, m in enumerate(loop):
            linears = [l for l in m if isinstance(l, nn.Linear)]
            bns = [b for b in m if isinstance(b, nn.BatchNorm1d) and b.affine]
            for w, lin in zip(batched.weights, linears):
                lin.weight.copy_(w[h].T)
            for norm, bn in zip(batched.norms, bns):
                d = bn.num_features
                norm.weight[h * d:(h + 1) * d].uniform_(0.5, 1.5)  # non-trivial affine parameters
                norm.bias[h * d:(h + 1) * d].uniform_(-0.5, 0.5)
                bn.weight.copy_(norm.weight[h * d:(h + 1) * d])
                bn.bias.copy_(norm.bias[h * d:(h + 1) * d])
    x = torch.randn(heads, groups * n, 8, dtype=torch.float64, requires_grad=True)
    out_b = batched(x, groups=groups)
    out_l = torch.stack([torch.cat([m(x[h, g * n:(g + 1) * n]) for g in range(groups)])
                         for h, m in enumerate(loop)])
    torch.testing.assert_close(out_b, out_l, rtol=0, atol=1e-10)
    g = torch.randn_like(out_b)
    (gx_b,) = torch.autograd.grad(out_b, x, g, retain_graph=True)
    (gx_l,) = torch.autograd.grad(out_l, x, g, retain_graph=True)
    torch.testing.assert_close(gx_b, gx_l, rtol=0, atol=1e-10)
    gw_b = torch.autograd.grad(out_b, list(batched.weights), g)
    for h, m in enumerate(loop):
        gw_l = torch.autograd.grad(out_l, [l.weight for l in m if isinstance(l, nn.Linear)], g, retain_graph=True)
        for a, b in zip(gw_b, gw_l):
            torch.testing.assert_close(a[h].T, b, rtol=0, atol=1e-10)


def test_heads_layout_and_layers():
    cfg = cfg_for()
    model = sdssl.SDSSL(cfg, models.build_model("vit_debug", image_size=32, patch_size=8), sdssl.isd_layers(cfg, 2))
    assert model.layers == [1] and isinstance(model.isd_projector, models.BatchedMLP)
    assert sdssl.isd_layers(cfg_for("--isd_every", "3"), 12) == [3, 6, 9]
    assert sdssl.isd_layers(cfg_for("--alpha_max", "0", "--pred_loss", "false"), 12) == []  # the plain method
    vit = models.build_model("vit_debug", image_size=32, patch_size=8)
    byol = sdssl.SDSSL(cfg_for("--framework", "byol"), vit, [1])
    assert not isinstance(byol.projector[-1], nn.BatchNorm1d) and len(byol.isd_predictor.norms) == 1  # no output BN
    h, q, qp = model([torch.randn(4, 3, 32, 32)])[0]
    assert h.shape == q.shape == qp.shape == (2, 4, 32)


def test_resnet_variant_pools_each_stage():
    """Sec. 4.6's ResNet variant: the intermediate layers are stages 1-3 (--isd_every 1), each average-pooled to its
    width, and the last layer's features are the backbone's own output."""
    cfg = config.parse(sdssl.Config, ["--arch", "resnet18", "--image_size", "32", "--isd_every", "1",
                                      "--proj_hidden_dim", "64", "--isd_hidden_dim", "32", "--pred_hidden_dim", "64",
                                      "--proj_dim", "32"])
    resnet = models.build_model("resnet18", image_size=32)
    layers = sdssl.isd_layers(cfg, sdssl.backbone_depth(cfg, resnet))
    model = sdssl.SDSSL(cfg, resnet, layers).eval()
    assert layers == [1, 2, 3]
    x = torch.randn(2, 3, 32, 32)
    features = model.layer_features(x)
    assert [f.shape for f in features] == [(2, 64), (2, 128), (2, 256), (2, 512)]
    torch.testing.assert_close(features[-1], resnet(x), rtol=0, atol=0)
    h, q, qp = model([x])[0]
    assert h.shape == q.shape == qp.shape == (4, 2, 32)  # 3 intermediate heads and the last, per image


def test_alpha_schedule_endpoints():
    assert schedules.ramp_up(0, 100, 1.0) == 0.0 and schedules.ramp_up(100, 100, 1.0) == pytest.approx(1.0)
    assert schedules.ramp_up(50, 100, 0.8) == pytest.approx(0.4)


def test_pred_loss_updates_only_the_predictors(process_group):
    torch.manual_seed(0)
    cfg = cfg_for("--alpha_max", "0")
    model = sdssl.SDSSL(cfg, models.build_model("vit_debug", image_size=32, patch_size=8), [1])
    teacher = sdssl.Teacher(model)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model([x1, x2])
    z = (teacher(x1), teacher(x2))
    _, terms = sdssl.sdssl_loss(cfg, out, z, alpha=0.0)
    terms["pred"].backward()
    for name, p in model.named_parameters():
        got = p.grad is not None and p.grad.abs().sum() > 0
        assert got == ("predictor" in name), name  # only predictor weights (last and intermediate) get gradient
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


# ----- end to end -----

def check_two_rank_run(out, framework):
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(math.isfinite(r["loss"]) for r in rows)
    assert "isd" in rows[-1] and ("pred" in rows[-1]) == (framework != "simclr") and "knn_top1" in rows[-1]
    blob = load_ckpt(out)
    assert ("teacher" in blob) == (framework != "simclr")
    assert any(k.startswith("isd_projector.") for k in blob["model"])


@pytest.mark.parametrize("framework", ["byol", "simclr"])
def test_two_rank_run_on_the_pool(image_folder, gloo_pool, tmp_path, framework):
    out = str(tmp_path / framework)
    gloo_pool.run(run_script, "sdssl", tiny_args(image_folder, out, "--framework", framework, *TINY_HEADS))
    check_two_rank_run(out, framework)


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """SD-MoCo v3 (vit_debug), 2 ranks (launched), 2 epochs, k-NN every epoch, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("sdssl") / "mocov3")
    launch("sdssl.py", tiny_args(image_folder, out, "--framework", "mocov3", *TINY_HEADS, "--save_every", "1"))
    return out


@pytest.mark.e2e
def test_two_rank_smoke_and_per_layer_knn(run, keep_group, capsys):
    check_two_rank_run(run, "mocov3")
    from eval import knn  # per-layer k-NN on the checkpoint: one row per block
    knn.main(["--checkpoint", os.path.join(run, "last.pt"), "--layer", "all", "--k", "5", "--num_workers", "0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 2  # vit_debug has 2 blocks


@pytest.mark.e2e
def test_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool): the same student, teacher,
    optimizer and scaler state."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "sdssl", tiny_args(image_folder, resumed, "--framework", "mocov3", *TINY_HEADS,
                                                        "--save_every", "1", "--eval_every", "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "teacher", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert read_log(resumed)[0]["epoch"] == 1


def test_isd_head_none_needs_a_predictor():
    cfg = cfg_for("--framework", "simclr", "--isd_head", "none")
    with pytest.raises(config.ConfigError, match="needs a ViT and a predictor"):
        sdssl.SDSSL(cfg, models.build_model("vit_debug", image_size=32, patch_size=8), [1])


@pytest.mark.parametrize("framework", ["mocov3", "byol"])
def test_isd_head_none_on_a_vit_wider_than_the_projection(process_group, framework):
    """Table 6 'w/o MLP': the intermediate predictors read the CLS token itself (width embed_dim = 32 here), while
    the last layer's heads end at proj_dim = 16, as on every real ViT (384/768 vs 256). The loss runs, and its
    isd term is the framework's L_ssl of pred_l(CLS_l) against the other view's teacher output."""
    torch.manual_seed(0)
    cfg = cfg_for("--framework", framework, "--isd_head", "none", "--proj_dim", "16")
    vit = models.build_model("vit_debug", image_size=32, patch_size=8, num_heads=2)
    model = sdssl.SDSSL(cfg, vit, [1])
    teacher = sdssl.Teacher(model)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model([x1, x2])
    z = (teacher(x1), teacher(x2))
    loss, terms = sdssl.sdssl_loss(cfg, out, z, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss) and set(terms) == {"ssl", "isd", "pred"}
    assert model.isd_predictor.weights[0].shape[1] == 32  # the predictor's input is the 32-wide CLS
    with torch.no_grad():
        cls = [model.layer_features(x)[0] for x in (x1, x2)]  # block 1's normed CLS per view, (4, 32)
        q = [model.isd_predictor(c[None])[0] for c in cls]  # (4, 16)
        ssl = (lambda a, b: sdssl.contrastive_loss(a, b, 0.2)) if framework == "mocov3" else sdssl.regression_loss
        torch.testing.assert_close(terms["isd"], ssl(q[0], z[1]) + ssl(q[1], z[0]))


def test_sd_simclr_normalises_both_views_together():
    """SimCLR (simclr.py, the authors' SimCLR path) sends the two views through the network as one batch of 2n, so
    BatchNorm in the heads normalises over both; MoCo v3 and BYOL keep one pass per view. The SD-SimCLR outputs
    equal the heads applied to the concatenated batch, for the last layer and the intermediate one."""
    torch.manual_seed(0)
    cfg = cfg_for("--framework", "simclr")
    model = sdssl.SDSSL(cfg, models.build_model("vit_debug", image_size=32, patch_size=8, num_heads=2), [1])
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) + 1.0  # a shifted second view
    (h1, _, _), (h2, _, _) = model([x1, x2])
    feats = model.layer_features(torch.cat([x1, x2]))  # [(8, 32)]: block 1, then the last
    last = model.projector(feats[-1])  # (8, D): BN over both views
    inter = model.isd_projector(feats[0][None])[0]  # (8, D)
    torch.testing.assert_close(torch.cat([h1[-1], h2[-1]]), last)
    torch.testing.assert_close(torch.cat([h1[0], h2[0]]), inter)
