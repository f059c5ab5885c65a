"""IFACLR in simclr.py (IFACD slides, appendix A): the loss against a loop transcription of SupCon 'all' over
[B, views x layers, D], the detached layers of lwclr, simlwclr's pairing, two gloo ranks vs one process, and a 2-rank
torchrun run with the layer-similarity log and per-layer k-NN on its checkpoint."""
import math
import os

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F

import simclr
from common import config, dist, models
from conftest import launch, load_ckpt, read_log, tiny_args

VIT = ["--arch", "vit_debug", "--patch_size", "8", "--num_heads", "2"]


def naive_supcon(z, tau):
    """Khosla et al. Eq. 2 (L^sup_out), labels = the image: for every representation i of every image b,
    -1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)), averaged over all B*V anchors."""
    b_n, v_n, _ = z.shape
    flat = [(b, v) for b in range(b_n) for v in range(v_n)]
    total = 0.0
    for b, v in flat:
        zi = F.normalize(z[b, v], dim=0)
        sims = {(c, w): torch.dot(zi, F.normalize(z[c, w], dim=0)) / tau for c, w in flat if (c, w) != (b, v)}
        log_denominator = torch.logsumexp(torch.stack(list(sims.values())), 0)
        positives = [sims[(b, w)] - log_denominator for w in range(v_n) if w != v]
        total = total - sum(positives) / len(positives)
    return total / len(flat)


@pytest.mark.parametrize("b, v, tau", [(1, 2, 0.5), (4, 3, 0.5), (5, 4, 0.07)])
def test_loss_matches_loop_supcon(process_group, b, v, tau):
    torch.manual_seed(b * 10 + v)
    z = torch.randn(b, v, 6, dtype=torch.float64, requires_grad=True)
    ours, ref = simclr.ifaclr_loss(z, tau), naive_supcon(z, tau)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, z)
    g_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


def test_two_views_one_layer_is_nt_xent(process_group):
    """With V = 2 (two views, one layer each) SupCon is SimCLR's NT-Xent."""
    z = torch.randn(6, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(simclr.ifaclr_loss(z, 0.5), simclr.simclr_loss(z[:, 0], z[:, 1], 0.5))


def cfg_for(*flags):
    return config.parse(simclr.Config, ["--proj_hidden_dim", "16", "--proj_dim", "8", *VIT, *flags])


def test_lwclr_sends_no_gradient_through_the_detached_layers(process_group):
    """lwclr: the intermediate layers' CLS tokens are detached, so the backbone's gradient is that of a loss in
    which they are constants; without the detach (simlwclr's default) it differs."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for detach in (True, False):
        torch.manual_seed(1)
        model = simclr.build_model(cfg_for("--method", "lwclr", "--detach_layers", str(detach).lower()), 32)
        loss = simclr.ifaclr_loss(model(x), 0.5)
        params = [p for p in model.backbone.parameters() if p.requires_grad]
        grads[detach] = torch.autograd.grad(loss, params, allow_unused=True)
        # the reference: the same features built by hand, block 1's CLS a constant
        _, tokens = model.backbone.forward_intermediates(x, norm=False)
        cls = torch.stack([tokens[0][:, 0].detach() if detach else tokens[0][:, 0], tokens[1][:, 0]], dim=1)
        z = model.projector(model.layer_norm(cls).flatten(0, 1)).view(4, 2, -1)
        ref = torch.autograd.grad(simclr.ifaclr_loss(z, 0.5), params, allow_unused=True)
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
    torch.testing.assert_close(simclr.ifaclr_objective(cfg, z), expected, rtol=0, atol=1e-9)


def test_heads_and_bad_input():
    model = simclr.build_model(cfg_for("--method", "lwclr", "--head", "prototype", "--head_norm", "ln",
                                       "--proj_layers", "3"), 32)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear", "LayerNorm"]
    slides = simclr.build_model(cfg_for("--method", "lwclr", "--head", "slides", "--head_norm", "bn"), 32)
    assert [type(m).__name__ for m in slides.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 2, 8)
    with pytest.raises(config.ConfigError, match="needs a ViT"):
        simclr.build_model(config.parse(simclr.Config, ["--method", "lwclr", "--arch", "resnet8"]), 32)
    with pytest.raises(config.ConfigError, match="layers <= its depth"):
        simclr.build_model(cfg_for("--method", "lwclr", "--layers", "3"), 32)


# ----- 2 gloo ranks vs one process -----

N, V, D_IN = 6, 3, 5


def make_batch_and_net():
    torch.manual_seed(0)
    return torch.randn(N, V, D_IN, dtype=torch.float64), torch.nn.Linear(D_IN, 4).double()


def _worker(rank, tmp):
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    x, net = make_batch_and_net()
    net_ddp = dist.ddp(net, dist.Context(rank, rank, 2, torch.device("cpu")))
    loss = simclr.ifaclr_loss(net_ddp(x[rank * N // 2:(rank + 1) * N // 2]), 0.5)
    loss.backward()
    torch.save({"grad": [p.grad for p in net.parameters()], "loss": loss.detach()}, f"{tmp}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_two_ranks_equal_one_process(process_group, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    x, net = make_batch_and_net()
    full = simclr.ifaclr_loss(net(x), 0.5)
    full.backward()
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close((outs[0]["loss"] + outs[1]["loss"]) / 2, full.detach(), rtol=0, atol=1e-9)
    for out in outs:
        for ours, ref in zip(out["grad"], net.parameters()):
            torch.testing.assert_close(ours, ref.grad, rtol=0, atol=1e-9)


# ----- end to end -----

def test_two_rank_lwclr_run_logs_layer_similarity_and_per_layer_knn(image_folder, tmp_path):
    out = str(tmp_path / "lwclr")
    launch("simclr.py", tiny_args(image_folder, out, *VIT, "--method", "lwclr", "--head", "prototype",
                                  "--head_norm", "ln", "--clip_grad_norm", "1.0"))
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss"]) and -1 <= r["layer_cos"] <= 1 for r in rows) and "knn_top1" in rows[-1]
    assert any(k.startswith("layer_norm.") for k in load_ckpt(out)["model"])
    knn = launch("eval/knn.py", ["--checkpoint", os.path.join(out, "last.pt"), "--layer", "all", "--k", "5",
                                 "--num_workers", "0"], nproc=0)
    assert len([line for line in knn.stdout.splitlines() if line.strip()[:1].isdigit()]) == 2  # one row per block


@pytest.mark.parametrize("method", ["lwclr", "simlwclr"])
def test_resume_is_bit_exact(process_group, image_folder, tmp_path, monkeypatch, method):
    """2 epochs straight vs the epoch-1 checkpoint resumed: the same model (shared LayerNorm included), optimizer."""
    import shutil
    from conftest import assert_same_tensors
    from test_wiring import argv, run_main
    flags = [*VIT, "--method", method, "--clip_grad_norm", "1.0"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_main("simclr", argv("simclr", image_folder, straight, *flags), monkeypatch)
    os.makedirs(resumed)
    shutil.copy(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))
    run_main("simclr", argv("simclr", image_folder, resumed, *flags), monkeypatch)
    a, b = load_ckpt(straight), load_ckpt(resumed)
    for key in ("model", "optimizer", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert "layer_cos" in read_log(straight)[-1]
