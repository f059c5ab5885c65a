import pytest
import torch
import torch.nn as nn
import torchvision

from common import models
from common.config import ConfigError
from common.vit import sincos_pos_embed


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_is_torchvision_without_fc(name):
    ours = models.build_model(name, image_size=224)
    tv = getattr(torchvision.models, name)()
    assert n_params(ours) == n_params(tv) - n_params(tv.fc)
    assert ours.embed_dim == tv.fc.in_features
    missing, unexpected = tv.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    assert ours(torch.randn(2, 3, 64, 64)).shape == (2, ours.embed_dim)


def test_cifar_stem():
    m = models.build_model("resnet18", image_size=32)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert [s.shape[-1] for s in m.forward_stages(torch.randn(2, 3, 32, 32))] == [32, 16, 8, 4]
    tv = torchvision.models.resnet18()  # the CIFAR-stem export loads once conv1 is the 3x3 one
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    tv.load_state_dict(m.state_dict(), strict=False)
    assert models.build_model("resnet18", image_size=224).conv1.kernel_size == (7, 7)


def test_vit_small_shapes_and_params():
    vit = models.build_model("vit_small", image_size=224, patch_size=16)
    assert 21.5e6 < n_params(vit) < 21.7e6  # ViT-S/16 without head: 21.67M with the (frozen) pos_embed
    x = torch.randn(2, 3, 224, 224)
    cls, tokens = vit.forward_intermediates(x)
    assert len(tokens) == 12 and tokens[0].shape == (2, 197, 384)
    torch.testing.assert_close(cls, vit(x))
    torch.testing.assert_close(tokens[-1][:, 0], cls)
    raw_cls, raw = vit.forward_intermediates(x, norm=False)
    torch.testing.assert_close(vit.norm(raw[3]), tokens[3])
    assert vit.last_attention(x).shape == (2, 12, 197, 197)


def test_vit_patch32_and_frozen_patch_embed():
    vit = models.build_model("vit_small", image_size=224, patch_size=32, stop_grad_patch_embed=True)
    assert vit.pos_embed.shape == (1, 50, 384) and not vit.pos_embed.requires_grad
    assert not vit.patch_embed.proj.weight.requires_grad
    vit(torch.randn(2, 3, 224, 224)).sum().backward()
    assert vit.patch_embed.proj.weight.grad is None and vit.cls_token.grad is not None


def test_vit_init_follows_mocov3():
    vit = models.build_model("vit_base", image_size=32, patch_size=16)
    qkv = vit.blocks[0].attn.qkv.weight  # uniform with bound sqrt(6 / (dim + dim)) (fan split over q, k, v)
    assert qkv.abs().max() <= (6 / (768 + 768)) ** 0.5 and qkv.abs().max() > 0.9 * (6 / (768 + 768)) ** 0.5
    assert vit.cls_token.std() < 1e-5


def test_sincos_pos_embed():
    pe = sincos_pos_embed(4, 16)
    assert pe.shape == (1, 17, 16) and torch.all(pe[0, 0] == 0)
    assert torch.allclose(pe[0, 1:].norm(dim=1), torch.full((16,), 8 ** 0.5))  # 8 sin/cos pairs per position


def test_sincos_pos_embed_puts_the_row_first_as_mocov3():
    """MoCo v3's vits.py (and SDSSL's copy): the first dim/4 channels of patch (row r, column c) are sin(r omega),
    the next dim/4 cos(r omega), then sin and cos of c omega; patches are numbered row by row."""
    grid, dim = 3, 16
    pe = sincos_pos_embed(grid, dim)[0, 1:]
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    for r in range(grid):
        for c in range(grid):
            expected = torch.cat([(r * omega).sin(), (r * omega).cos(), (c * omega).sin(), (c * omega).cos()])
            assert torch.equal(pe[r * grid + c], expected), (r, c)


@pytest.mark.parametrize("kwargs, call", [
    (dict(name="vit_small"), 'timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12)'),
    (dict(name="vit_small", num_heads=6), 'timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=6)'),
    (dict(name="vit_base", patch_size=32), 'timm.create_model("vit_base_patch32_224", num_classes=0, num_heads=12)'),
    (dict(name="vit_small", image_size=96),
     'timm.create_model("vit_small_patch16_224", num_classes=0, num_heads=12, img_size=96)'),
    (dict(name="vit_debug", image_size=32, patch_size=8), "timm.models.vision_transformer.VisionTransformer("
     "img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)"),
])
def test_timm_call_names_the_head_count(kwargs, call):
    """timm's vit_small has 6 heads (DeiT), ours 12 (MoCo v3): the state dict loads either way, so the call that
    rebuilds our ViT must name the heads (and the image size when it is not 224)."""
    kwargs = {"image_size": 224, "patch_size": 16, **kwargs}
    with torch.device("meta"):  # shapes only: no weights are drawn
        assert models.build_model(kwargs.pop("name"), **kwargs).timm_call() == call


@pytest.mark.parametrize("name, size, patch", [("vit_small", 224, 16), ("vit_debug", 32, 8)])
def test_timm_loads_our_vit_and_computes_the_same(name, size, patch):
    timm = pytest.importorskip("timm")
    ours = models.build_model(name, image_size=size, patch_size=patch).eval()
    theirs = eval(ours.timm_call(), {"timm": timm}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
        if name == "vit_small":  # the trap: timm's default 6-head ViT-S loads the same weights, computes otherwise
            default = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
            default.load_state_dict(ours.state_dict(), strict=True)
            assert (default(x) - ours(x)).abs().max() > 0.01


def test_mlp_builder():
    head = models.mlp(16, 32, 8, num_layers=3, last_norm=True)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [l.out_features for l in linears] == [32, 32, 8] and all(l.bias is None for l in linears)
    assert isinstance(head[-1], nn.BatchNorm1d) and not head[-1].affine
    pred = models.mlp(8, 32, 8, num_layers=2, last_norm=False, last_bias=True)
    assert isinstance(pred[-1], nn.Linear) and pred[-1].bias is not None
    ln = models.mlp(8, 16, 4, num_layers=2, norm="ln")
    assert isinstance(ln[1], nn.LayerNorm) and isinstance(ln[-1], nn.LayerNorm)
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown arch 'resnet19'"):
        models.build_model("resnet19")
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        models.build_model("vit_small", image_size=100, patch_size=16)
