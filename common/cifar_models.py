"""The CIFAR-100 model zoo of RepDistiller (Tian et al. 2020, github.com/HobbitLong/RepDistiller
`models/`), students and teachers of CRD and IFACD, one section per family below:
  resnet8..110, resnet8x4, resnet32x4   CIFAR ResNets of BasicBlocks (3 stages)
  ResNet50                              the 4-stage bottleneck ResNet-50 at CIFAR resolution
                                        (resnetv2.py)
  wrn_16_1..wrn_40_2                    wide ResNets (pre-activation)
  vgg8..vgg19                           VGG with BN
  MobileNetV2                           RepDistiller's `mobile_half`: MobileNetV2, expansion 6,
                                        width 0.5
  ShuffleV1, ShuffleV2                  ShuffleNet v1 (3 groups) and v2 (1x) for 32 px images
The names are RepDistiller's `model_dict` keys.

`build_cifar_model(name, num_classes=100)` is the one entry point; the parameter counts equal
METHODS.md section 10 and RepDistiller's own models (tests/test_cifar_models.py), and the parameter
and buffer names are RepDistiller's, so its state dicts load as they are (strict). The init is
RepDistiller's too (per family, below).
`model(x)` returns logits; `model(x, features=True)` returns `Features`, collected in the forward
pass itself (no hooks, so it behaves the same under DDP and autocast). With num_classes=0 the model
is headless (no classifier): `model(x)` returns the pooled feature (B, embed_dim), the backbone the
SSL scripts train. `model.feat_modules()`: RepDistiller's `get_feat_modules()`, the backbone modules
FSP's and AB's init stage trains.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ConfigError


@dataclass
class Features:
    """What distillation reads, as RepDistiller's `model(x, is_feat=True, preact=...)` returns it.

    `stages`: feat[:-1] (preact=False), the stem then every stage output: f0..f3 (resnet, wrn,
    ShuffleV1/V2), f0..f4 (vgg, ResNet50, MobileNetV2). Post-ReLU for resnet/ResNet50/vgg/ShuffleV1;
    for wrn the raw residual sum, before the next BN-ReLU; for MobileNetV2 the linear-bottleneck
    block outputs (f0: the stem's ReLU); for ShuffleV2 the channel-shuffled concatenation of carried
    channels and a branch's ReLU output.
    `pooled` (B, embed_dim) = feat[-1], the global average pool of the last map (see `last_stage`).
    `logits`: the classifier's output (None when headless).
    `last_stage`: the maps of the last stage IFACD picks from (fork `models/extractor.py`,
    layers='last'), ReLU outputs in network order; the last one is always the map `pooled` averages.
    resnet: mid-block then block-output ReLU of every stage-3 block (one block there in resnet8/8x4,
    so stage 2's last block comes first, as in the fork); wrn: relu1, relu2 of every block3 block,
    then the final BN-ReLU; vgg: the outputs of blocks 1-4. Not run with IFACD yet, same rule:
    ResNet50: relu1, relu2, output of every layer4 block; MobileNetV2: the expand and depthwise
    ReLUs of every block of blocks 5-6 (f3 -> f4; the block outputs are linear), then the 1x1 head
    conv2's ReLU; ShuffleV1: relu1 (before the shuffle), relu2 and output of every layer3 unit;
    ShuffleV2: per layer3 unit the first ReLU of its (right) branch and the unit's output, then the
    1x1 head conv2's ReLU.
    `preact`: feat[:-1] with preact=True, what AB distills; f0 is always stages[0]. resnet,
    ResNet50, vgg, ShuffleV1: each stage's last block output before its final ReLU
    (relu(preact[i]) = stages[i]); wrn: stage i's output through the BN that follows it
    (block2/block3's first bn1, the final bn1), before that BN's ReLU (RepDistiller runs those BNs a
    second time, in train mode a second update of their running statistics; here they are the
    forward's own); ShuffleV2: the last unit's concatenation (carried half, branch before its last
    ReLU), NOT channel-shuffled, so stages[i] = shuffle(relu(preact[i])); MobileNetV2 ignores
    preact: the same list as `stages`.
    The Features are bit-identical to RepDistiller's on its own weights (checked for all 22 models,
    eval and train)."""
    stages: list
    pooled: torch.Tensor
    logits: torch.Tensor
    last_stage: list
    preact: list


def _pool(x):
    """(B, C, H, W) -> (B, C), the global average pool as RepDistiller writes it for resnet, wrn
    (AvgPool2d(8)), ShuffleV1/V2 (avg_pool2d(4)) and MobileNetV2 (AvgPool2d(input_size // 16)): a
    fixed window that covers the whole last map at 32 px. A window of the map's own size is that,
    bit for bit, and a global pool at any input size (RepDistiller's fails or pools less than the
    map elsewhere)."""
    return F.avg_pool2d(x, x.shape[2:]).flatten(1)


# the global average pool of vgg and ResNet50, RepDistiller's AdaptiveAvgPool2d((1, 1))
def _adaptive_pool(x):
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _classifier(dim, num_classes):
    return nn.Linear(dim, num_classes) if num_classes else None  # 0: headless (SSL backbones)


def _outputs(classifier, stages, pooled, last_stage, preact, features):
    """logits (pooled feature when headless), or Features."""
    logits = classifier(pooled) if classifier is not None else None
    if features:
        return Features(stages, pooled, logits, last_stage, preact)
    return pooled if logits is None else logits


# -------------------------------- resnet-D (He et al. 2016, CIFAR) --------------------------------

class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape changes), ReLU. Returns (out,
    mid-block ReLU, the sum before the final ReLU)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        mid = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(mid)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), mid, pre


class ResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6  # BasicBlocks per stage
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        # stage i maps c[i] -> c[i+1] channels; stages 2 and 3 halve the resolution in their first
        # block
        c = widths
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*[
            BasicBlock(c[i] if b == 0 else c[i + 1], c[i + 1], 2 if i and b == 0 else 1)
            for b in range(n)])
            for i in range(3))
        self.fc = _classifier(c[3], num_classes)
        self.embed_dim = c[3]
        # RepDistiller's init: He normal (fan_out) convs, BN = identity, default Linear
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feat_modules(self):
        """conv1, bn1, layer1-3: all but fc (RepDistiller's list also holds its parameterless ReLU
        module)."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, preact, relus = [x], [x], []  # relus: [(mid, out)] of every block of stages 2 and 3
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for block in layer:
                x, mid, pre = block(x)
                if i:
                    relus.append((mid, x))
            stages.append(x)
            preact.append(pre)
        # one block in stage 3: stage 2's last one too
        keep = len(self.layer3) if len(self.layer3) > 1 else 2
        return _outputs(self.fc, stages, _pool(x), [t for pair in relus[-keep:] for t in pair],
                        preact, features)


# ------------------ ResNet50 (He et al. 2016, ImageNet design with a CIFAR stem) ------------------

class Bottleneck(nn.Module):
    """1x1 conv-BN-ReLU, 3x3 conv (stride)-BN-ReLU, 1x1 conv-BN to 4x the width + shortcut
    (1x1 conv + BN when the shape changes), ReLU. Returns (out, the sum before the final ReLU,
    relu1, relu2)."""

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # RepDistiller: an empty Sequential, no state
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        r1 = F.relu(self.bn1(self.conv1(x)))
        r2 = F.relu(self.bn2(self.conv2(r1)))
        pre = self.bn3(self.conv3(r2)) + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(pre), pre, r1, r2


class ResNetV2(nn.Module):
    """RepDistiller's `resnetv2.ResNet`: 3x3 stride-1 stem (no max-pool), four stages of Bottlenecks
    of widths 64, 128, 256, 512 (x4 out), stages 2-4 halving the resolution: 32 -> 4 px maps at
    32 px input."""

    def __init__(self, blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, c = [], 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(c, width, 2 if i and b == 0 else 1))
                c = 4 * width
            layers.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = _classifier(c, num_classes)
        self.embed_dim = c
        # RepDistiller's init: He normal (fan_out) convs, BN = identity, default Linear
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feat_modules(self):
        """conv1, bn1, layer1-4: all but the classifier `linear`."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3,
                              self.layer4])

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, preact, relus = [x], [x], []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            for block in layer:
                x, pre, r1, r2 = block(x)
                relus += [r1, r2, x] if i == 3 else []
            stages.append(x)
            preact.append(pre)
        return _outputs(self.linear, stages, _adaptive_pool(x), relus, preact, features)


# ---------------------- wrn-D-w (Zagoruyko & Komodakis 2016), pre-activation ----------------------

class WideBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut. When the shape changes, the shortcut (1x1 conv) also
    reads the pre-activated input, as in the reference code. Returns (out, relu1, relu2, bn1's
    output before relu1)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

    def forward(self, x):
        b1 = self.bn1(x)
        r1 = F.relu(b1)
        r2 = F.relu(self.bn2(self.conv1(r1)))
        shortcut = x if self.convShortcut is None else self.convShortcut(r1)
        # dropout 0 (RepDistiller's default): no dropout layer
        return shortcut + self.conv2(r2), r1, r2, b1


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if b == 0 else cout, cout,
                                               stride if b == 0 else 1)
                                     for b in range(n)])


class WideResNet(nn.Module):
    def __init__(self, depth, width, num_classes):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (NetworkBlock(n, c[i], c[i + 1], 1 if i == 0 else 2)
                                                 for i in range(3))
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = _classifier(c[3], num_classes)
        self.embed_dim = c[3]
        # reference init: N(0, sqrt(2 / (k*k*out))) convs, BN = identity, Linear bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def feat_modules(self):
        """conv1, block1-3: not the final bn1 (whose output AB's last preact is) nor fc."""
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def forward(self, x, features=False):
        x = self.conv1(x)
        stages, preact, relus = [x], [x], []
        for i, group in enumerate((self.block1, self.block2, self.block3)):
            for j, block in enumerate(group.layer):
                x, r1, r2, b1 = block(x)
                relus += [r1, r2] if i == 2 else []
                # the first BN of stages 2 and 3 reads stage 1's and 2's output: their preact
                if i and j == 0:
                    preact.append(b1)
            stages.append(x)
        b = self.bn1(x)
        final = F.relu(b)
        return _outputs(self.fc, stages, _pool(final), relus + [final], preact + [b], features)


# ---------------------------- vggN with BN (Simonyan & Zisserman 2015) ----------------------------

# per block; convs per block for each depth (RepDistiller cfg S, A, B, D, E):
VGG_WIDTHS = (64, 128, 256, 512, 512)
VGG_CONVS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
             19: (2, 2, 4, 4, 4)}


def _vgg_block(cin, widths):
    """conv(bias)-BN-ReLU repeated; the block's last ReLU is left to forward (RepDistiller's
    `layers[:-1]`)."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, depth, num_classes):
        super().__init__()
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _vgg_block(3 if i == 0 else VGG_WIDTHS[i - 1], [VGG_WIDTHS[i]] * VGG_CONVS[depth][i])
            for i in range(5))
        self.classifier = _classifier(512, num_classes)
        self.embed_dim = 512
        # reference init: He normal (fan_out) convs with zero bias, Linear N(0, 0.01)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def feat_modules(self):
        """block0-4: all but the classifier (RepDistiller's list interleaves its parameterless
        pooling modules)."""
        return nn.ModuleList([self.block0, self.block1, self.block2, self.block3, self.block4])

    def forward(self, x, features=False):
        stages, preact = [], []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3,
                                   self.block4)):
            # max-pool after blocks 0-2 only: pool3 is skipped at 32 px (RepDistiller pools there
            # only at 64 px)
            pre = block(F.max_pool2d(x, 2) if 1 <= i <= 3 else x)
            x = F.relu(pre)
            stages.append(x)
            preact.append(x if i == 0 else pre)  # RepDistiller has no pre-ReLU f0
        return _outputs(self.classifier, stages, _adaptive_pool(x), stages[1:5], preact, features)


# ---------------- MobileNetV2 (Sandler et al. 2018), RepDistiller's `mobile_half` -----------------

# (expansion (None: T), width, blocks, first stride) per group
MBV2_BLOCKS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
               (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))
MBV2_STAGE_ENDS = (1, 2, 4, 6)  # RepDistiller's f1..f4: the outputs of block groups 1, 2, 4 and 6


def _conv_bn_relu(cin, cout, kernel, stride):
    """RepDistiller's conv_bn / conv_1x1_bn: a Sequential of conv, BN, ReLU (the names 0.*, 1.* its
    state dicts use)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand conv-BN-ReLU (also at expansion 1), 3x3 depthwise conv (stride)-BN-ReLU, 1x1
    project conv-BN (the linear bottleneck), + x when the shape is kept. `conv` is RepDistiller's
    8-slot Sequential (slots 2 and 5: the ReLUs), so its names load. Returns (out, relu1, relu2)."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        expand, bn1, relu1, depthwise, bn2, relu2, project, bn3 = self.conv
        r1 = relu1(bn1(expand(x)))
        r2 = relu2(bn2(depthwise(r1)))
        out = bn3(project(r2))
        return (x + out if self.residual else out), r1, r2


class MobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 (from the RCO paper's code): a 3x3 stride-2 stem, 7 groups of
    InvertedResiduals (widths x `width`), a 1x1 conv-BN-ReLU head `conv2` to 1280 channels (not
    scaled below width 1), global average pool. At 32 px the maps go 16 -> 2 px; RepDistiller's
    AvgPool2d(input_size // 16) is that global pool."""

    def __init__(self, expansion, width, num_classes):
        super().__init__()
        c = int(32 * width)
        self.conv1 = _conv_bn_relu(3, c, 3, 2)
        self.blocks = nn.ModuleList()
        for t, cout, n, stride in MBV2_BLOCKS:
            cout = int(cout * width)
            group = []
            for b in range(n):
                group.append(InvertedResidual(c, cout, stride if b == 0 else 1, t or expansion))
                c = cout
            self.blocks.append(nn.Sequential(*group))
        self.embed_dim = int(1280 * width) if width > 1 else 1280
        self.conv2 = _conv_bn_relu(c, self.embed_dim, 1, 1)
        self.classifier = (nn.Sequential(_classifier(self.embed_dim, num_classes)) if num_classes
                           else None)
        # RepDistiller's init: N(0, sqrt(2 / (k*k*out))) convs, BN = 1, 0, Linear N(0, 0.01)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(2. / (m.kernel_size[0] * m.kernel_size[1]
                                                             * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def feat_modules(self):
        """conv1 (the stem) and blocks: not the 1x1 head conv2, whose output is pooled, nor the
        classifier."""
        return nn.ModuleList([self.conv1, self.blocks])

    def forward(self, x, features=False):
        x = self.conv1(x)
        stages, relus = [x], []
        for i, group in enumerate(self.blocks):
            for block in group:
                x, r1, r2 = block(x)
                relus += [r1, r2] if i > MBV2_STAGE_ENDS[-2] else []
            if i in MBV2_STAGE_ENDS:
                stages.append(x)
        x = self.conv2(x)
        # preact: ignored
        return _outputs(self.classifier, stages, _pool(x), relus + [x], stages, features)


# ------------------- ShuffleNet v1 (Zhang et al. 2018) and v2 (Ma et al. 2018) --------------------

def _shuffle(x, groups):
    """Channel shuffle: channels viewed as (groups, C/groups), transposed, flattened back."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: grouped 1x1 conv-BN-ReLU to a quarter of the branch width, channel
    shuffle, 3x3 depthwise conv (stride)-BN-ReLU (RepDistiller keeps this ReLU; the paper has
    none), grouped 1x1 conv-BN; then + x, or, when the unit downsamples (stride 2), concatenated
    with a 3x3 stride-2 average pool of x, so its branch makes only cout - cin channels. The unit
    reading the 24-channel stem has an ungrouped first conv (and so no shuffle).
    Returns (out, the sum / concatenation before the final ReLU, relu1 (before the shuffle),
    relu2)."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        branch = cout - cin if stride == 2 else cout
        mid, self.groups1, self.stride = branch // 4, 1 if cin == 24 else groups, stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x):
        r1 = F.relu(self.bn1(self.conv1(x)))
        r2 = F.relu(self.bn2(self.conv2(_shuffle(r1, self.groups1) if self.groups1 > 1 else r1)))
        out = self.bn3(self.conv3(r2))
        pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x
        return F.relu(pre), pre, r1, r2


class ShuffleNetV1(nn.Module):
    """RepDistiller's ShuffleV1: a 1x1 conv-BN-ReLU stem to 24 channels at full resolution, three
    stages of ShuffleUnits (the first of each downsamples) of widths 240, 480, 960 with 3 groups:
    32 -> 4 px maps. PyTorch's default init (RepDistiller sets none)."""

    def __init__(self, widths, blocks, groups, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        layers, c = [], 24
        for width, n in zip(widths, blocks):
            layers.append(nn.Sequential(*[ShuffleUnit(c if b == 0 else width, width,
                                                      2 if b == 0 else 1, groups)
                                          for b in range(n)]))
            c = width
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = _classifier(c, num_classes)
        self.embed_dim = c

    def feat_modules(self):
        """conv1, bn1, layer1-3: all but the classifier `linear`."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, preact, relus = [x], [x], []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for unit in layer:
                x, pre, r1, r2 = unit(x)
                relus += [r1, r2, x] if i == 2 else []
            stages.append(x)
            preact.append(pre)
        return _outputs(self.linear, stages, _pool(x), relus, preact, features)


class ShuffleUnitV2(nn.Module):
    """ShuffleNet v2 basic unit (RepDistiller's BasicBlock): the channels split in halves; the
    second goes through 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU and is
    concatenated after the untouched first; the result is shuffled (2 groups). Returns (out,
    relu1, the branch before its last ReLU)."""

    def __init__(self, c):
        super().__init__()
        c //= 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        half = x.shape[1] // 2
        r1 = F.relu(self.bn1(self.conv1(x[:, half:])))
        pre = self.bn3(self.conv3(self.bn2(self.conv2(r1))))
        return _shuffle(torch.cat([x[:, :half], F.relu(pre)], 1), 2), r1, pre


class DownUnitV2(nn.Module):
    """ShuffleNet v2 downsampling unit (RepDistiller's DownBlock): two stride-2 branches of cout/2
    channels, concatenated and shuffled. Left: 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU; right: 1x1
    conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU. Returns (out, the right branch's first
    ReLU, None)."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        r1 = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(r1)))))
        return _shuffle(torch.cat([left, right], 1), 2), r1, None


class ShuffleNetV2(nn.Module):
    """RepDistiller's ShuffleV2 (net size 1): a 1x1 conv-BN-ReLU stem to 24 channels at full
    resolution, three stages (a DownUnitV2 then 3, 7, 3 ShuffleUnitV2s) of widths 116, 232, 464, a
    1x1 conv-BN-ReLU head `conv2` to 1024 channels: 32 -> 4 px maps. PyTorch's default init
    (RepDistiller sets none)."""

    def __init__(self, widths, blocks, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        layers, c = [], 24
        for width, n in zip(widths, blocks):
            layers.append(nn.Sequential(DownUnitV2(c, width),
                                        *[ShuffleUnitV2(width) for _ in range(n)]))
            c = width
        self.layer1, self.layer2, self.layer3 = layers
        self.embed_dim = 1024
        self.conv2 = nn.Conv2d(c, self.embed_dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.embed_dim)
        self.linear = _classifier(self.embed_dim, num_classes)

    def feat_modules(self):
        """conv1, bn1, layer1-3: not the 1x1 head conv2 / bn2, whose output is pooled, nor the
        classifier."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def forward(self, x, features=False):
        x = F.relu(self.bn1(self.conv1(x)))
        stages, preact, relus = [x], [x], []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3)):
            for unit in layer:
                carried, (x, r1, pre) = x, unit(x)
                relus += [r1, x] if i == 2 else []
            stages.append(x)
            # the last unit's input half and branch, unshuffled (a concat only the feature path
            # pays)
            if features:
                preact.append(torch.cat([carried[:, :carried.shape[1] // 2], pre], 1))
        x = F.relu(self.bn2(self.conv2(x)))
        return _outputs(self.linear, stages, _pool(x), relus + [x], preact, features)


# -------------------------------------------- the zoo ---------------------------------------------

CIFAR_MODELS = {
    **{f"resnet{d}": (ResNet, dict(depth=d, widths=[16, 16, 32, 64]))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (ResNet, dict(depth=8, widths=[32, 64, 128, 256])),
    "resnet32x4": (ResNet, dict(depth=32, widths=[32, 64, 128, 256])),
    "ResNet50": (ResNetV2, dict(blocks=(3, 4, 6, 3))),
    **{f"wrn_{d}_{w}": (WideResNet, dict(depth=d, width=w)) for d in (16, 40) for w in (1, 2)},
    **{f"vgg{d}": (VGG, dict(depth=d)) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": (MobileNetV2, dict(expansion=6, width=0.5)),
    "ShuffleV1": (ShuffleNetV1, dict(widths=(240, 480, 960), blocks=(4, 8, 4), groups=3)),
    "ShuffleV2": (ShuffleNetV2, dict(widths=(116, 232, 464), blocks=(3, 7, 3))),
}


def build_cifar_model(name, num_classes=100):
    """A CIFAR model of the zoo by name, with its classifier; `.embed_dim` is the pooled feature's
    width."""
    if name not in CIFAR_MODELS:
        raise ConfigError(f"unknown CIFAR model '{name}'; choose one of {list(CIFAR_MODELS)}")
    cls, kwargs = CIFAR_MODELS[name]
    return cls(num_classes=num_classes, **kwargs)


@torch.no_grad()
def feature_shapes(model, image_size=32):
    """The Features of a 2-image probe batch, as shapes (logits None for a headless model):
    distillation heads are sized from it. Runs in eval mode (BN statistics untouched) and restores
    the model's mode."""
    mode = model.training
    p = next(model.parameters())
    f = model.eval()(torch.zeros(2, 3, image_size, image_size, device=p.device, dtype=p.dtype),
                     features=True)
    model.train(mode)
    logits = f.logits.shape if f.logits is not None else None
    return Features([t.shape for t in f.stages], f.pooled.shape, logits,
                    [t.shape for t in f.last_stage], [t.shape for t in f.preact])
