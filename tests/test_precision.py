"""Mixed precision and torch.compile: bf16 autocast keeps every script's loss finite and close to float32; a
checkpoint written from a compiled run has plain keys and loads without compilation."""
import pytest
import torch

import byol
import mocov3
import sdssl
import simclr
import simsiam_gsg
from common import config, dist, models
from helpers import launch, load_ckpt, tiny_args


def forward(model, x, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return model(x)


def test_bf16_autocast_keeps_the_losses_finite_and_close(process_group):
    """The training steps cast the autocast outputs to float32 before the loss: with bf16 activations every
    script's loss stays finite and within 2% of the float32 value on a tiny ViT + head."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(models.build_model("vit_debug", image_size=32, patch_size=8),
                              models.mlp(32, 64, 16, 2, last_norm=True)).train()
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    losses = {
        "simclr": lambda a, b: simclr.simclr_loss(a, b, 0.2),
        "mocov3": lambda a, b: mocov3.mocov3_loss(a, b, 0.2) + mocov3.mocov3_loss(b, a, 0.2),
        "byol": lambda a, b: byol.byol_loss(a, b) + byol.byol_loss(b, a),
        "simsiam": lambda a, b: simsiam_gsg.simsiam_loss(a, b),
        "sdssl_ctr": lambda a, b: sdssl.contrastive_loss(torch.cat([a, a]), b, 0.2, num_layers=2),
    }
    out = {dtype: (forward(net, x1, dtype).float(), forward(net, x2, dtype).float())
           for dtype in (torch.float32, torch.bfloat16)}
    for name, loss in losses.items():
        ref, low = loss(*out[torch.float32]), loss(*out[torch.bfloat16])
        assert torch.isfinite(low), name
        # 2% or bf16's resolution near 1 (2^-8): a loss near 0, as SimSiam's -cos here, cannot come closer (torch 2.4's
        # CPU bf16 kernels land 0.0017 away on this batch, 2.14's within 0.001)
        assert abs(low.item() - ref.item()) <= 0.02 * abs(ref.item()) + 2 ** -8, (name, low.item(), ref.item())


def test_half_precision_normalisation_is_why_losses_run_in_float32(process_group):
    """fp16 overflows in the sum of squares of a plain L2 normalisation (a known NT-Xent failure); the same
    projections cast to float32 first, as every training step does, give the right loss."""
    z = torch.full((4, 256), 300.0, dtype=torch.float16) + torch.arange(4, dtype=torch.float16)[:, None]
    assert not torch.isfinite((z * z).sum(dim=1)).all()  # 256 x 300^2 > 65504
    assert torch.isfinite(simclr.simclr_loss(z.float(), z.float(), 0.5))


def test_compiled_model_saves_plain_keys(process_group):
    """dist.prepare compiles the DDP wrapper; the checkpoint is written from the plain module, so its keys carry no
    `module.` / `_orig_mod.` prefix and load strictly into an uncompiled model."""
    cfg = config.parse(simclr.Config, ["--arch", "vit_debug", "--patch_size", "8", "--proj_hidden_dim", "16"])
    model, model_ddp, note = dist.prepare(simclr.build_model(cfg, 32), process_group, sync_bn=False, compile=True)
    assert "torch.compile on" in note and hasattr(model_ddp, "_orig_mod")  # the compiled wrapper is what trains
    assert any(k.startswith("_orig_mod.module.") for k in model_ddp.state_dict())
    fresh = simclr.build_model(cfg, 32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert list(fresh.state_dict()) == list(model.state_dict())


@pytest.mark.slow
def test_checkpoint_written_with_compile_resumes_without_it(image_folder, tmp_path):
    """End to end (slow: compiles a ViT on the CPU): 1 epoch with --compile true, then resume without it."""
    out = str(tmp_path / "run")
    args = ["--arch", "vit_debug", "--patch_size", "8", "--eval_every", "0", "--aug_device", "cpu"]
    launch("simclr.py", tiny_args(image_folder, out, *args, "--epochs", "1", "--compile", "true"), nproc=0)
    assert not any(k.startswith(("_orig_mod", "module.")) for k in load_ckpt(out)["model"])
    run = launch("simclr.py", tiny_args(image_folder, out, *args, "--epochs", "2"), nproc=0)
    assert "resumed from" in run.stdout and load_ckpt(out)["epoch"] == 2
