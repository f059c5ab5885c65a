"""common/cifar_models.py: exact parameter counts (METHODS.md section 10), the feature API, RepDistiller's names."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from common.cifar_models import CIFAR_MODELS, _shuffle, build_cifar_model, feature_shapes
from common.config import ConfigError

# METHODS.md section 10 (RepDistiller models, num_classes = 100), and the pooled feature width.
PARAMS = {"resnet8": (83_892, 64), "resnet14": (181_108, 64), "resnet20": (278_324, 64), "resnet32": (472_756, 64),
          "resnet44": (667_188, 64), "resnet56": (861_620, 64), "resnet110": (1_736_564, 64),
          "resnet8x4": (1_233_540, 256), "resnet32x4": (7_433_860, 256), "wrn_16_1": (180_916, 64),
          "wrn_16_2": (703_284, 128), "wrn_40_1": (569_780, 64), "wrn_40_2": (2_255_156, 128),
          "vgg8": (3_965_028, 512), "vgg11": (9_277_284, 512), "vgg13": (9_462_180, 512),
          "vgg16": (14_774_436, 512), "vgg19": (20_086_692, 512),
          # RepDistiller's cross-architecture models: counted on its own code (models/*.py of HobbitLong/RepDistiller,
          # instantiated with num_classes=100 in a scratch dir outside this repo), not in METHODS.md.
          "ResNet50": (23_705_252, 2048), "MobileNetV2": (812_836, 1280), "ShuffleV1": (949_258, 960),
          "ShuffleV2": (1_355_528, 1024)}
# S000 'Number of Parameters', 'kd' row: teacher + student, millions, column order of the slides.
PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet56", "resnet20"),
         ("resnet32x4", "resnet8x4"), ("resnet110", "resnet20")]
KD_ROW = [2.96, 2.82, 13.43, 1.14, 8.67, 2.01]


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


def linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_zoo_has_exactly_the_twenty_two_models():
    assert sorted(CIFAR_MODELS) == sorted(PARAMS) and len(PARAMS) == 22


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_pooled_width(name):
    with torch.device("meta"):  # shapes only: no weights are drawn
        model = build_cifar_model(name)
    assert count(model) == PARAMS[name][0]
    assert model.embed_dim == PARAMS[name][1]
    (classifier,) = linears(model)  # fc, classifier, linear or (MobileNetV2) classifier.0
    assert (classifier.in_features, classifier.out_features) == (model.embed_dim, 100)


def test_teacher_plus_student_reproduces_the_slides_kd_row():
    counts = {name: PARAMS[name][0] for name in PARAMS}
    assert [round((counts[t] + counts[s]) / 1e6, 2) for t, s in PAIRS] == KD_ROW


@pytest.mark.parametrize("name, stages, last_stage", [
    ("resnet20", [(16, 32), (16, 32), (32, 16), (64, 8)], 6),     # 3 blocks in stage 3 x (mid, out)
    ("resnet8x4", [(32, 32), (64, 32), (128, 16), (256, 8)], 4),  # one block in stage 3: stage 2's comes first
    ("wrn_16_2", [(16, 32), (32, 32), (64, 16), (128, 8)], 5),    # 2 blocks x (relu1, relu2) + final BN-ReLU
    ("vgg8", [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 4),
    ("ResNet50", [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)], 9),  # 3 layer4 blocks x (relu1, relu2, out)
    ("MobileNetV2", [(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], 9),     # 4 blocks x (expand, dw) + head conv2
    ("ShuffleV1", [(24, 32), (240, 16), (480, 8), (960, 4)], 12),             # 4 units x (relu1, relu2, out)
    ("ShuffleV2", [(24, 32), (116, 16), (232, 8), (464, 4)], 9),              # 4 units x (branch relu, out) + conv2
])
def test_features(name, stages, last_stage):
    torch.manual_seed(0)
    model = build_cifar_model(name).eval()
    x = torch.randn(3, 3, 32, 32)
    f = model(x, features=True)
    assert [(t.shape[1], t.shape[2]) for t in f.stages] == stages and len(f.last_stage) == last_stage
    assert [t.shape for t in f.preact] == [t.shape for t in f.stages]  # RepDistiller's feat[:-1], preact=True
    assert torch.equal(f.logits, model(x))  # the feature path is the plain forward
    assert torch.allclose(f.pooled, F.adaptive_avg_pool2d(f.last_stage[-1], 1).flatten(1))  # ifacd1 = pooled feature
    if name.startswith("vgg"):
        assert all(a is b for a, b in zip(f.last_stage, f.stages[1:]))  # blocks 1-4 outputs
    if name.startswith("resnet") or name in ("ResNet50", "ShuffleV1"):
        assert f.last_stage[-1] is f.stages[-1] and all((t >= 0).all() for t in f.stages)  # post-ReLU
    if name.startswith("wrn"):
        assert (f.stages[-1] < 0).any()  # raw residual sums (RepDistiller's feat), not activated
        assert torch.allclose(f.last_stage[-1], F.relu(model.bn1(f.stages[-1])))
    if name == "MobileNetV2":
        assert (f.stages[-1] < 0).any()  # linear bottlenecks; the pooled map is the 1x1 head's ReLU
        assert torch.equal(f.last_stage[-1], model.conv2(f.stages[-1]))
    if name == "ShuffleV2":
        assert torch.equal(f.last_stage[-1], F.relu(model.bn2(model.conv2(f.stages[-1]))))
    assert all((t >= 0).all() for t in f.last_stage)  # ReLU outputs
    shapes = feature_shapes(model.train())
    assert model.training and [s[1:] for s in shapes.stages] == [t.shape[1:] for t in f.stages]
    assert [s[1:] for s in shapes.preact] == [t.shape[1:] for t in f.preact]


@pytest.mark.parametrize("name", ["resnet8x4", "ResNet50", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2"])
def test_preact_is_repdistillers(name):
    """`preact` = RepDistiller's feat[:-1] at preact=True (what AB distills), as its code for each model implies: f0
    unchanged; the last block's output before its final ReLU; wrn: the stage output through the next BN; ShuffleV2:
    that, before the channel shuffle; MobileNetV2 ignores the flag."""
    torch.manual_seed(0)
    model = build_cifar_model(name).eval()
    f = model(torch.randn(2, 3, 32, 32), features=True)
    assert f.preact[0] is f.stages[0]
    pairs = list(zip(f.preact[1:], f.stages[1:]))
    if name == "MobileNetV2":
        assert all(p is s for p, s in pairs)
    elif name.startswith("wrn"):
        bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
        assert all(torch.equal(p, bn(s)) for (p, s), bn in zip(pairs, bns))
        assert torch.equal(F.relu(f.preact[-1]), f.last_stage[-1])
    elif name == "ShuffleV2":
        assert all(torch.equal(_shuffle(F.relu(p), 2), s) and not torch.equal(F.relu(p), s) for p, s in pairs)
        assert all((p < 0).any() for p, _ in pairs)
    else:  # resnet, ResNet50, vgg, ShuffleV1
        assert all(torch.equal(F.relu(p), s) and (p < 0).any() for p, s in pairs)


# The parameters (and BN buffers) of `feat_modules()`, RepDistiller's get_feat_modules(): the whole model but these.
FEAT_MODULES_EXCLUDE = {"resnet20": ("fc.",), "ResNet50": ("linear.",), "wrn_16_2": ("bn1.", "fc."),
                        "vgg8": ("classifier.",), "MobileNetV2": ("conv2.", "classifier."),
                        "ShuffleV1": ("linear.",), "ShuffleV2": ("conv2.", "bn2.", "linear.")}


@pytest.mark.parametrize("name", sorted(FEAT_MODULES_EXCLUDE))
def test_feat_modules_are_repdistillers(name):
    model = build_cifar_model(name)
    modules = model.feat_modules()
    assert isinstance(modules, torch.nn.ModuleList)
    held = {id(t) for t in [*modules.parameters(), *modules.buffers()]}
    state = [*model.named_parameters(), *model.named_buffers()]
    assert {k for k, t in state if id(t) in held} == \
        {k for k, _ in state if not k.startswith(FEAT_MODULES_EXCLUDE[name])}


# sha256 of the sorted lines "name:shape" (shape as AxBxC, '' for a scalar) of the state dict: the expected digests
# were computed on RepDistiller's own models (HobbitLong/RepDistiller models/*.py, num_classes=100), instantiated in a
# scratch dir outside this repo. Equal digests: its checkpoints load here with strict=True.
STATE_DICT_SHA256 = {
    "ResNet50": "fc8911e14af586b3fc5925a630b0dc1e87fcbdbcd95aed7d9936244ccce6f92c",
    "MobileNetV2": "b97e51549e7cf1244ad315ab4d56682cf3ed2d15d91d3b2497046f25bdcaf0cb",
    "ShuffleV1": "b714b6c6e46b33bdbf62e976f896a53e194f2ab15454cf7640d95dbd0bda5a99",
    "ShuffleV2": "07d59692e0bad170ede51640cc2cc83e26ba83929553f1c1adb75586bb922bf3",
    "resnet20": "9ae23db380f6609a904cc910da2f6d09ad02167be891ee7811f59d1cb5d5e44f",
    "wrn_16_2": "af3878270cfa238e1c6965cd4f456d728ac2300e45a93e9f39e6a781de1a9610",
    "vgg8": "3e03c7261910e8247230728daf5b733bb58f5f8a61ba1b8eebe7ecab578abaff",
}


@pytest.mark.parametrize("name", sorted(STATE_DICT_SHA256))
def test_state_dict_names_and_shapes_are_repdistillers(name):
    lines = sorted(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in build_cifar_model(name).state_dict().items())
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == STATE_DICT_SHA256[name]


def test_repdistiller_parameter_names():
    """RepDistiller's pretrained state dicts load as they are: same parameter names."""
    assert {"conv1.weight", "layer3.0.downsample.0.weight", "layer3.8.bn2.bias", "fc.weight"} <= \
        set(build_cifar_model("resnet56").state_dict())
    assert {"block3.layer.0.convShortcut.weight", "block3.layer.5.bn2.running_var", "bn1.weight", "fc.bias"} <= \
        set(build_cifar_model("wrn_40_2").state_dict())
    assert {"block0.0.bias", "block0.1.weight", "block4.4.weight", "classifier.weight"} <= \
        set(build_cifar_model("vgg13").state_dict())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown CIFAR model 'resnet19'"):
        build_cifar_model("resnet19")


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "wrn_16_2", "vgg8", "ResNet50", "MobileNetV2", "ShuffleV1",
                                  "ShuffleV2"])
def test_headless_zoo_backbones_for_ssl(name):
    """models.build_model gives the zoo without its classifier: forward -> the pooled feature (B, embed_dim), the
    same tensor as the classifier's input, at 28 px (Fashion-MNIST) as at 32 px."""
    from common import models
    torch.manual_seed(0)
    headless = models.build_model(name)
    full = build_cifar_model(name)
    assert count(headless) == PARAMS[name][0] - (PARAMS[name][1] * 100 + 100)
    full.load_state_dict(headless.state_dict(), strict=False)
    x = torch.randn(2, 3, 28, 28)
    headless.eval(), full.eval()
    out = headless(x)
    assert out.shape == (2, PARAMS[name][1])
    torch.testing.assert_close(out, full(x, features=True).pooled)
    assert headless(x, features=True).logits is None
