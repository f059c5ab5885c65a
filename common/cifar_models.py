"""The CIFAR-100 model zoo of RepDistiller (Tian et al. 2020, github.com/HobbitLong/RepDistiller `models/`), students
and teachers of CRD and IFACD: resnet8..110, resnet8x4/32x4, wrn_16_1..wrn_40_2, vgg8..19 (with BN).

`build_cifar_model(name, num_classes=100)` is the one entry point; the parameter counts equal METHODS.md section 10
(tests/test_cifar_models.py) and the parameter names are RepDistiller's, so its state dicts load as they are.
`model(x)` returns logits; `model(x, features=True)` returns `Features`, collected in the forward pass itself (no
hooks, so it behaves the same under DDP and autocast). With num_classes=0 the model is headless (no classifier):
`model(x)` returns the pooled feature (B, embed_dim), the backbone the SSL scripts train.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ConfigError


@dataclass
class Features:
    """What distillation reads. `stages`: RepDistiller's feat[:-1], the stem then every stage output (post-ReLU for
    resnet/vgg; for wrn the raw residual sum, before the next BN-ReLU), f0..f3 (vgg: f0..f4). `pooled` (B, embed_dim)
    = feat[-1]. `last_stage`: the ReLU outputs inside the last stage IFACD picks from (fork `models/extractor.py`,
    layers='last'), in network order: resnet: mid-block then block-output ReLU of every stage-3 block (one block there
    in resnet8/8x4, so stage 2's last block comes first, as in the fork); wrn: relu1, relu2 of every block3 block, then
    the final BN-ReLU; vgg: the outputs of blocks 1-4."""
    stages: list
    pooled: torch.Tensor
    logits: torch.Tensor
    last_stage: list


def _pool(x):  # (B, C, H, W) -> (B, C); = RepDistiller's AvgPool2d(8) on the 8x8 maps of 32 px inputs
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _classifier(dim, num_classes):
    return nn.Linear(dim, num_classes) if num_classes else None  # 0: headless (SSL backbones)


def _outputs(classifier, stages, pooled, last_stage, features):
    """logits (pooled feature when headless), or Features."""
    logits = classifier(pooled) if classifier is not None else None
    if features:
        return Features(stages, pooled, logits, last_stage)
    return pooled if logits is None else logits


# ------------------------------------ resnet-D (He et al. 2016, CIFAR) ------------------------------------

class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape changes), ReLU. Returns (out, mid-block ReLU)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        mid = F.relu(self.bn1(self.conv1(x)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(mid)) + shortcut), mid


class ResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6  # BasicBlocks per stage
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths  # stage i maps c[i] -> c[i+1] channels; stages 2 and 3 halve the resolution in their first block
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*[
            BasicBlock(c[i] if b == 0 else c[i + 1], c[i + 1], 2 if i and b == 0 else 1) for b in range(n)])
            for i in range(3))
        self.fc = _classifier(c[3], num_classes)
        self.embed_dim = c[3]
        for m in self.modules():  # RepDistiller's init: He normal (fan_out) convs, BN = identity, default Linear
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, relus = [x], []  # relus: [(mid, out)] of every block of stages 2 and 3
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for block in layer:
                x, mid = block(x)
                if i:
                    relus.append((mid, x))
            stages.append(x)
        keep = len(self.layer3) if len(self.layer3) > 1 else 2  # one block in stage 3: stage 2's last one too
        return _outputs(self.fc, stages, _pool(x), [t for pair in relus[-keep:] for t in pair], features)


# ---------------------------- wrn-D-w (Zagoruyko & Komodakis 2016), pre-activation ----------------------------

class WideBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut. When the shape changes, the shortcut (1x1 conv) also reads the
    pre-activated input, as in the reference code. Returns (out, relu1, relu2)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x):
        r1 = F.relu(self.bn1(x))
        r2 = F.relu(self.bn2(self.conv1(r1)))
        shortcut = x if self.convShortcut is None else self.convShortcut(r1)
        return shortcut + self.conv2(r2), r1, r2  # dropout 0 (RepDistiller's default): no dropout layer


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1)
                                     for b in range(n)])


class WideResNet(nn.Module):
    def __init__(self, depth, width, num_classes):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (NetworkBlock(n, c[i], c[i + 1], 1 if i == 0 else 2) for i in range(3))
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = _classifier(c[3], num_classes)
        self.embed_dim = c[3]
        for m in self.modules():  # reference init: N(0, sqrt(2 / (k*k*out))) convs, BN = identity, Linear bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x, features=False):
        x = self.conv1(x)
        stages, relus = [x], []
        for i, group in enumerate((self.block1, self.block2, self.block3)):
            for block in group.layer:
                x, r1, r2 = block(x)
                relus += [r1, r2] if i == 2 else []
            stages.append(x)
        final = F.relu(self.bn1(x))
        return _outputs(self.fc, stages, _pool(final), relus + [final], features)


# ------------------------------- vggN with BN (Simonyan & Zisserman 2015) -------------------------------

VGG_WIDTHS = (64, 128, 256, 512, 512)  # per block; convs per block for each depth (RepDistiller cfg S, A, B, D, E):
VGG_CONVS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _vgg_block(cin, widths):
    """conv(bias)-BN-ReLU repeated; the block's last ReLU is left to forward (RepDistiller's `layers[:-1]`)."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, depth, num_classes):
        super().__init__()
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _vgg_block(3 if i == 0 else VGG_WIDTHS[i - 1], [VGG_WIDTHS[i]] * VGG_CONVS[depth][i]) for i in range(5))
        self.classifier = _classifier(512, num_classes)
        self.embed_dim = 512
        for m in self.modules():  # reference init: He normal (fan_out) convs with zero bias, Linear N(0, 0.01)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x, features=False):
        stages = []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            # max-pool after blocks 0-2 only: pool3 is skipped at 32 px (RepDistiller pools there only at 64 px)
            x = F.relu(block(F.max_pool2d(x, 2) if 1 <= i <= 3 else x))
            stages.append(x)
        return _outputs(self.classifier, stages, _pool(x), stages[1:5], features)


# ---------------------------------------------------- the zoo ----------------------------------------------------

CIFAR_MODELS = {
    **{f"resnet{d}": (ResNet, dict(depth=d, widths=[16, 16, 32, 64])) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (ResNet, dict(depth=8, widths=[32, 64, 128, 256])),
    "resnet32x4": (ResNet, dict(depth=32, widths=[32, 64, 128, 256])),
    **{f"wrn_{d}_{w}": (WideResNet, dict(depth=d, width=w)) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (VGG, dict(depth=d)) for d in (8, 11, 13, 16, 19)},
}


def build_cifar_model(name, num_classes=100):
    """A CIFAR model of the zoo by name, with its classifier; `.embed_dim` is the pooled feature's width."""
    if name not in CIFAR_MODELS:
        raise ConfigError(f"unknown CIFAR model '{name}'; choose one of {list(CIFAR_MODELS)}")
    cls, kwargs = CIFAR_MODELS[name]
    return cls(num_classes=num_classes, **kwargs)


@torch.no_grad()
def feature_shapes(model, image_size=32):
    """The Features of a 2-image probe batch, as shapes: distillation heads are sized from it. Runs in eval mode
    (BN statistics untouched) and restores the model's mode."""
    mode = model.training
    p = next(model.parameters())
    f = model.eval()(torch.zeros(2, 3, image_size, image_size, device=p.device, dtype=p.dtype), features=True)
    model.train(mode)
    return Features([t.shape for t in f.stages], f.pooled.shape, f.logits.shape, [t.shape for t in f.last_stage])
