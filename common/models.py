"""Backbones and MLP heads. `build_model(name, **kw)` is the single entry point for backbones.

Every backbone is headless and has `.embed_dim`. ResNets are torchvision's own classes, so their
state dicts load into `torchvision.models.resnet18/50()` (only `fc.*` is missing); the CIFAR stem
(3x3 stride-1 conv, no max-pool, SimCLR App. B.9) changes `conv1`'s shape only. The ViT lives in
common/vit.py with timm's parameter names.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.cifar_models import CIFAR_MODELS, build_cifar_model
from common.config import ConfigError
from common.vit import VisionTransformer


class ResNet(torchvision.models.ResNet):
    """torchvision's ResNet without the classifier: `forward` returns the pooled feature
    (B, embed_dim)."""

    def __init__(self, block, layers, cifar_stem=False, zero_init_residual=False):
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.embed_dim = self.fc.in_features
        del self.fc

    def forward_stages(self, x):
        """The four stage outputs [(B, C_i, H_i, W_i)] (SDSSL's ResNet variant pools each of
        them)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages

    def forward(self, x):
        return torch.flatten(self.avgpool(self.forward_stages(x)[-1]), 1)


BasicBlock, Bottleneck = torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck
BACKBONES = {
    "resnet18": dict(family="resnet", block=BasicBlock, layers=[2, 2, 2, 2]),
    "resnet50": dict(family="resnet", block=Bottleneck, layers=[3, 4, 6, 3]),
    # vit_debug is a 2-block, 32-d ViT for smoke tests and CPU debugging, not for training.
    "vit_debug": dict(family="vit", embed_dim=32, depth=2, num_heads=2),
    # vit_mini: 6 blocks, width 128, for 28-32 px images on a CPU (the Fashion-MNIST rows use 7 px
    # patches: 16 tokens). At width 192 it trained at half the speed and gained less over its random
    # init in the same minutes.
    "vit_mini": dict(family="vit", embed_dim=128, depth=6, num_heads=4),
    "vit_tiny": dict(family="vit", embed_dim=192, depth=12, num_heads=3),
    # 12 heads: MoCo v3 (DeiT uses 6)
    "vit_small": dict(family="vit", embed_dim=384, depth=12, num_heads=12),
    "vit_base": dict(family="vit", embed_dim=768, depth=12, num_heads=12),
}


def build_model(name, image_size=224, patch_size=16, cifar_stem=None, zero_init_residual=False,
                stop_grad_patch_embed=False, num_heads=None):
    """A headless backbone by name. ResNets use the CIFAR stem by default at image_size <= 32 (as
    SimCLR's code does); ViT options: patch_size, stop_grad_patch_embed (MoCo v3), num_heads
    (None = the table above).
    The CIFAR zoo (common/cifar_models.py: resnet8..110, resnet8x4/32x4, wrn_*, vgg*) comes without
    its classifier: small backbones for 28-32 px images on a CPU (their init is RepDistiller's;
    zero_init_residual does not apply)."""
    if name in CIFAR_MODELS:
        return build_cifar_model(name, num_classes=0)
    if name not in BACKBONES:
        raise ConfigError(f"unknown arch '{name}'; choose one of {list(ARCHS)}")
    spec = dict(BACKBONES[name])
    if spec.pop("family") == "resnet":
        return ResNet(spec["block"], spec["layers"],
                      cifar_stem=image_size <= 32 if cifar_stem is None else cifar_stem,
                      zero_init_residual=zero_init_residual)
    if num_heads:
        spec["num_heads"] = num_heads
    if spec["embed_dim"] % spec["num_heads"]:
        raise ConfigError(f"{name} has width {spec['embed_dim']}, not divisible by "
                          f"num_heads={spec['num_heads']}")
    if image_size % patch_size:
        raise ConfigError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    return VisionTransformer(img_size=image_size, patch_size=patch_size,
                             stop_grad_patch_embed=stop_grad_patch_embed, **spec)


# every name build_model accepts (the scripts' --arch choices)
ARCHS = tuple(BACKBONES) + tuple(CIFAR_MODELS)


def is_vit(name):
    return BACKBONES.get(name, {}).get("family") == "vit"


def use_channels_last(name, device):
    """NHWC memory layout: faster convolutions with cuDNN (ResNets on CUDA) and, on the CPU, for the
    small CIFAR-zoo nets (oneDNN: 1.3-1.7x per training step for resnet8..56 at 28 px on 2 cores;
    torchvision's ResNet-18 gains nothing there). Nothing to gain for a ViT."""
    if is_vit(name):
        return False
    return device.type == "cuda" or name in CIFAR_MODELS


def mlp(in_dim, hidden_dim, out_dim, num_layers, last_norm=True, norm="bn", last_bias=False,
        act="relu", layerwiseclr=False):
    """The one MLP head builder (projectors and predictors of every script).

    Hidden layers: Linear (no bias: the norm that follows has one) -> BN or LN -> ReLU (or GELU).
    Last layer: Linear, then an affine-free BN/LN when `last_norm` (SimCLR, MoCo v3, SimSiam
    projectors). `last_bias` only matters without a last norm (SimSiam's predictor has a bias; MoCo
    v3's does not). num_layers=1 is a single Linear. `layerwiseclr`: the IFACLR prototype's
    ProjectionMLPHead (arkel23/layerwiseclr heads.py): every Linear keeps its bias, the last norm is
    affine, LayerNorm eps 1e-12.
    """
    eps = {"eps": 1e-12} if layerwiseclr and norm == "ln" else {}
    norm_layer = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}[norm]
    act_layer = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}[act]
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=layerwiseclr), norm_layer(hidden_dim, **eps),
                   act_layer()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=layerwiseclr or (last_bias and not last_norm)))
    if last_norm and norm == "bn":
        layers.append(nn.BatchNorm1d(out_dim, affine=layerwiseclr))
    elif last_norm:
        layers.append(nn.LayerNorm(out_dim, elementwise_affine=layerwiseclr, **eps))
    return nn.Sequential(*layers)


class BatchedMLP(nn.Module):
    """`num_mlps` MLPs of one shape run together, x (num_mlps, rows, in) -> (num_mlps, rows, out),
    with one bmm per layer instead of a loop over the MLPs (SDSSL's per-layer heads then cost a
    few per cent of a step: README). Each is `mlp`'s layout: Linear (no bias) -> BN -> ReLU, ...,
    Linear (-> affine-free BN if last_norm). The rows are `groups` equal blocks (e.g. the views)
    that share the weights, so each weight is read once, but get their own BN statistics, exactly
    as separate passes would: BN runs on a block's (n, num_mlps * dim), per MLP and feature, so it
    is the separate MLPs' BN, and SyncBN conversion still applies."""

    def __init__(self, num_mlps, in_dim, hidden_dim, out_dim, num_layers, last_norm=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        # nn.Linear's default init per MLP: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.weights = nn.ParameterList([
            nn.Parameter(torch.empty(num_mlps, a, b).uniform_(-a ** -0.5, a ** -0.5))
            for a, b in zip(dims[:-1], dims[1:])])
        self.norms = nn.ModuleList([nn.BatchNorm1d(num_mlps * d) for d in dims[1:-1]])
        if last_norm:
            self.norms.append(nn.BatchNorm1d(num_mlps * out_dim, affine=False))

    def forward(self, x, groups=1):
        for i, w in enumerate(self.weights):
            x = torch.bmm(x, w)  # (num_mlps, rows, d_out): all groups at once
            if i < len(self.norms):
                m, rows, d = x.shape
                n = rows // groups
                x = torch.cat([self.norms[i](x[:, g * n:(g + 1) * n].transpose(0, 1).reshape(n, -1))
                               .view(n, m, d).transpose(0, 1) for g in range(groups)], dim=1)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
