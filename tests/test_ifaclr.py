"""ifaclr.py (IFACD slides, appendix A): the loss against a loop transcription of SupCon 'all' over
[B, views x layers, D], the detached layers of lwclr, simlwclr's pairing, the prototype's head, two gloo
ranks (the pool) vs one process, and a 2-rank launch with the layer-similarity log and per-layer k-NN on its
checkpoint, resumed bit-exactly on the pool (in one process: tests/test_wiring.py)."""
import math
import os

import pytest
import torch

import ifaclr
import simclr
from common import config, dist, models
from helpers import (assert_same_tensors, copy_epoch_1, launch, load_ckpt, naive_supcon, read_log, run_script,
                     tiny_args)

VIT = ["--arch", "vit_debug", "--patch_size", "8", "--num_heads", "2"]


@pytest.mark.parametrize("b, v, tau", [(1, 2, 0.5), (4, 3, 0.5), (5, 4, 0.07)])
def test_loss_matches_loop_supcon(process_group, b, v, tau):
    torch.manual_seed(b * 10 + v)
    z = torch.randn(b, v, 6, dtype=torch.float64, requires_grad=True)
    ours, ref = ifaclr.ifaclr_loss(z, tau), naive_supcon(z, tau)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, z)
    g_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


def test_two_views_one_layer_is_nt_xent(process_group):
    """With V = 2 (two views, one layer each) SupCon is SimCLR's NT-Xent."""
    z = torch.randn(6, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(ifaclr.ifaclr_loss(z, 0.5), simclr.simclr_loss(z[:, 0], z[:, 1], 0.5))


def cfg_for(*flags):
    return config.parse(ifaclr.Config, ["--proj_hidden_dim", "16", "--proj_dim", "8", *VIT, *flags])


def test_lwclr_sends_no_gradient_through_the_detached_layers(process_group):
    """lwclr: the intermediate layers' CLS tokens are detached, so the backbone's gradient is that of a loss in
    which they are constants; without the detach (simlwclr's default) it differs."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for detach in (True, False):
        torch.manual_seed(1)
        model = ifaclr.build_model(cfg_for("--method", "lwclr", "--detach_layers", str(detach).lower()), 32)
        loss = ifaclr.ifaclr_loss(model(x), 0.5)
        params = [p for p in model.backbone.parameters() if p.requires_grad]
        grads[detach] = torch.autograd.grad(loss, params, allow_unused=True)
        # the reference: the same features built by hand, block 1's CLS a constant
        _, tokens = model.backbone.forward_intermediates(x, norm=False)
        cls = torch.stack([tokens[0][:, 0].detach() if detach else tokens[0][:, 0], tokens[1][:, 0]], dim=1)
        z = model.projector(model.layer_norm(cls).flatten(0, 1)).view(4, 2, -1)
        ref = torch.autograd.grad(ifaclr.ifaclr_loss(z, 0.5), params, allow_unused=True)
        for a, b in zip(grads[detach], ref):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
    differ = [a is not None and not torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[True], grads[False])]
    assert any(differ)


def test_simlwclr_pairs_each_last_layer_with_the_other_views_layers(process_group):
    cfg = cfg_for("--method", "simlwclr", "--layers", "2")
    z = torch.randn(6, 2, 5, dtype=torch.float64)  # 2 views x 3 images, 2 layers
    z1, z2 = z[:3], z[3:]
    expected = 0.5 * (naive_supcon(torch.stack([z1[:, 1], z2[:, 0], z2[:, 1]], dim=1), cfg.temperature)
                      + naive_supcon(torch.stack([z2[:, 1], z1[:, 0], z1[:, 1]], dim=1), cfg.temperature))
    torch.testing.assert_close(ifaclr.ifaclr_objective(cfg, z), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm", ["ln", "bn"])
def test_prototype_head_is_layerwiseclrs(norm):
    """layerwiseclr heads.py ProjectionMLPHead(no_layers=3), written out by hand: Linear(d, h) with bias,
    norm(h), act, Linear(h, h) with bias, norm(h), act, Linear(h, o) with bias, norm(o), every norm affine;
    LayerNorm eps 1e-12 and GELU, or (--bn_proj) BatchNorm1d (default eps) and ReLU."""
    d, h, o = 32, 16, 8  # vit_debug's width, then cfg_for's head
    model = ifaclr.build_model(cfg_for("--head", "prototype", "--head_norm", norm), 32)
    act, norm_type = ("GELU", "LayerNorm") if norm == "ln" else ("ReLU", "BatchNorm1d")
    assert [type(m).__name__ for m in model.projector] == ["Linear", norm_type, act] * 2 + ["Linear", norm_type]
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.projector if type(m).__name__ == norm_type]
    assert [(m.in_features, m.out_features) for m in linears] == [(d, h), (h, h), (h, o)]
    assert all(m.bias is not None for m in linears) and all(m.weight is not None for m in norms)
    assert all(m.eps == (1e-12 if norm == "ln" else 1e-5) for m in norms)
    expected = (d * h + h) + 2 * h + (h * h + h) + 2 * h + (h * o + o) + 2 * o
    assert models.count_params(model.projector) == expected


def test_heads_and_bad_input():
    model = ifaclr.build_model(cfg_for("--method", "lwclr"), 32)
    slides = ifaclr.build_model(cfg_for("--method", "lwclr", "--head", "slides", "--head_norm", "bn"), 32)
    assert [type(m).__name__ for m in slides.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2, 8)
    with pytest.raises(config.ConfigError, match="arch='resnet8' is not one of"):  # ViTs only
        config.parse(ifaclr.Config, ["--arch", "resnet8"])
    with pytest.raises(config.ConfigError, match="layers <= the ViT's depth"):
        ifaclr.build_model(cfg_for("--method", "lwclr", "--layers", "3"), 32)


# ----- 2 gloo ranks vs one process -----

N, V, D_IN = 6, 3, 5


def make_batch_and_net():
    torch.manual_seed(0)
    return torch.randn(N, V, D_IN, dtype=torch.float64), torch.nn.Linear(D_IN, 4).double()


def _two_rank_step():
    """On each pool rank: its half of the batch through DDP, the loss, backward."""
    ctx = dist.setup("cpu")
    x, net = make_batch_and_net()
    net_ddp = dist.ddp(net, ctx)
    loss = ifaclr.ifaclr_loss(net_ddp(x[ctx.rank * N // 2:(ctx.rank + 1) * N // 2]), 0.5)
    loss.backward()
    return {"grad": [p.grad for p in net.parameters()], "loss": loss.detach()}


def test_two_ranks_equal_one_process(process_group, gloo_pool):
    outs = gloo_pool.run(_two_rank_step)
    x, net = make_batch_and_net()
    full = ifaclr.ifaclr_loss(net(x), 0.5)
    full.backward()
    torch.testing.assert_close((outs[0]["loss"] + outs[1]["loss"]) / 2, full.detach(), rtol=0, atol=1e-9)
    for out in outs:
        for ours, ref in zip(out["grad"], net.parameters()):
            torch.testing.assert_close(ours, ref.grad, rtol=0, atol=1e-9)


# ----- end to end -----

LWCLR = (*VIT, "--method", "lwclr", "--head", "prototype", "--head_norm", "ln", "--clip_grad_norm", "1.0",
         "--save_every", "1")


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    """lwclr with the prototype's head, 2 ranks (launched), 2 epochs, a checkpoint after each epoch."""
    out = str(tmp_path_factory.mktemp("ifaclr") / "lwclr")
    launch("ifaclr.py", tiny_args(image_folder, out, *LWCLR))
    return out


@pytest.mark.e2e
def test_two_rank_lwclr_run_logs_layer_similarity_and_per_layer_knn(run, keep_group, capsys):
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and -1 <= r["layer_cos"] <= 1 for r in rows) and "knn_top1" in rows[-1]
    assert any(k.startswith("layer_norm.") for k in load_ckpt(run)["model"])
    from eval import knn
    knn.main(["--checkpoint", os.path.join(run, "last.pt"), "--layer", "all", "--k", "5", "--num_workers", "0"])
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2  # one row per block


@pytest.mark.e2e
def test_resume_is_bit_exact(run, image_folder, gloo_pool, tmp_path):
    """The epoch-1 checkpoint of the 2-rank launch resumed on 2 ranks (the pool): the same model, optimizer and
    scaler state."""
    resumed = str(tmp_path / "resumed")
    copy_epoch_1(run, resumed)
    out = gloo_pool.run(run_script, "ifaclr", tiny_args(image_folder, resumed, *LWCLR, "--eval_every", "0"))[0]
    assert "resumed from" in out and "at epoch 1" in out
    a, b = load_ckpt(run), load_ckpt(resumed)
    for key in ("model", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
