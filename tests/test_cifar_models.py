"""common/cifar_models.py: exact parameter counts (METHODS.md section 10), the feature API, RepDistiller's names."""
import pytest
import torch
import torch.nn.functional as F

from common.cifar_models import CIFAR_MODELS, build_cifar_model, feature_shapes
from common.config import ConfigError

# METHODS.md section 10 (RepDistiller models, num_classes = 100), and the pooled feature width.
PARAMS = {"resnet8": (83_892, 64), "resnet14": (181_108, 64), "resnet20": (278_324, 64), "resnet32": (472_756, 64),
          "resnet44": (667_188, 64), "resnet56": (861_620, 64), "resnet110": (1_736_564, 64),
          "resnet8x4": (1_233_540, 256), "resnet32x4": (7_433_860, 256), "wrn_16_1": (180_916, 64),
          "wrn_16_2": (703_284, 128), "wrn_40_1": (569_780, 64), "wrn_40_2": (2_255_156, 128),
          "vgg8": (3_965_028, 512), "vgg11": (9_277_284, 512), "vgg13": (9_462_180, 512),
          "vgg16": (14_774_436, 512), "vgg19": (20_086_692, 512)}
# S000 'Number of Parameters', 'kd' row: teacher + student, millions, column order of the slides.
PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet56", "resnet20"),
         ("resnet32x4", "resnet8x4"), ("resnet110", "resnet20")]
KD_ROW = [2.96, 2.82, 13.43, 1.14, 8.67, 2.01]


pytestmark = pytest.mark.usefixtures("one_thread")


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_zoo_has_exactly_the_eighteen_models():
    assert sorted(CIFAR_MODELS) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count_and_pooled_width(name):
    model = build_cifar_model(name)
    assert count(model) == PARAMS[name][0]
    assert model.embed_dim == PARAMS[name][1]
    classifier = model.fc if hasattr(model, "fc") else model.classifier
    assert classifier.out_features == 100


def test_teacher_plus_student_reproduces_the_slides_kd_row():
    counts = {name: PARAMS[name][0] for name in PARAMS}
    assert [round((counts[t] + counts[s]) / 1e6, 2) for t, s in PAIRS] == KD_ROW


@pytest.mark.parametrize("name, stages, last_stage", [
    ("resnet20", [(16, 32), (16, 32), (32, 16), (64, 8)], 6),     # 3 blocks in stage 3 x (mid, out)
    ("resnet8x4", [(32, 32), (64, 32), (128, 16), (256, 8)], 4),  # one block in stage 3: stage 2's comes first
    ("wrn_16_2", [(16, 32), (32, 32), (64, 16), (128, 8)], 5),    # 2 blocks x (relu1, relu2) + final BN-ReLU
    ("vgg8", [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 4),
])
def test_features(name, stages, last_stage):
    torch.manual_seed(0)
    model = build_cifar_model(name).eval()
    x = torch.randn(3, 3, 32, 32)
    f = model(x, features=True)
    assert [(t.shape[1], t.shape[2]) for t in f.stages] == stages and len(f.last_stage) == last_stage
    assert torch.equal(f.logits, model(x))  # the feature path is the plain forward
    assert torch.allclose(f.pooled, F.adaptive_avg_pool2d(f.last_stage[-1], 1).flatten(1))  # ifacd1 = pooled feature
    if name.startswith("vgg"):
        assert all(a is b for a, b in zip(f.last_stage, f.stages[1:]))  # blocks 1-4 outputs
    if name.startswith("resnet"):
        assert f.last_stage[-1] is f.stages[-1] and all((t >= 0).all() for t in f.stages)  # post-ReLU
    if name.startswith("wrn"):
        assert (f.stages[-1] < 0).any()  # raw residual sums (RepDistiller's feat), not activated
        assert torch.allclose(f.last_stage[-1], F.relu(model.bn1(f.stages[-1])))
    shapes = feature_shapes(model.train())
    assert model.training and [s[1:] for s in shapes.stages] == [t.shape[1:] for t in f.stages]


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


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "wrn_16_2", "vgg8"])
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
