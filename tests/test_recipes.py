"""Every shipped config's recipe constants, pinned to the paper or the authors' code in one table per topic.

The statistical tests build both augmentation pipelines from the same recipe, and the smoke runs take whatever a
config says, so a wrong constant in a recipe or a config changes no other test: these tables are where they are
checked. Each row names its source.
"""
import glob
import importlib
import os
import sys

import pytest
import torch
import torch.nn as nn

from common import config
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import claims  # noqa: E402  (scripts/claims.py: which script runs each configs/claims/*.yaml)


CLAIM_SCRIPTS = {cfg[:-5]: spec["script"][:-3] for spec in claims.CLAIMS.values()  # configs/claims/*.yaml:
                 for cfg in [spec["config"]] + [c for c, _ in spec.get("setup", {}).values()]}  # their script


def load(relpath, *flags):
    """(script module, Config) for configs/<relpath>.yaml."""
    module = importlib.import_module(CLAIM_SCRIPTS.get(relpath, relpath.split("/")[0]))
    return module, config.parse(module.Config, ["--config", os.path.join(ROOT, "configs", relpath + ".yaml"), *flags])


def resnet_backbone(module, cfg, size):
    """The backbone the script trains, built by the script's own function."""
    if module.__name__ == "sdssl":
        return module.build_student(cfg, size).backbone
    return module.build_model(cfg, size).backbone


# ----- zero-initialised residual BN (the last BN of every block starts at gamma = 0) -----

ZERO_INIT = {  # config -> the authors' choice
    "simclr/cifar10_resnet18": True,  # SimCLR TF resnet.py: batch_norm_relu(init_zero=True) in both block types
    "simclr/imagenet_resnet50": True,
    "mocov3/imagenet_resnet50": True,  # moco-v3 main_moco.py: zero_init_residual=True
    "mocov3/cifar10_resnet18": False,  # solo-learn's CIFAR backbones: torchvision's default
    "mocov3/cifar100_resnet18": False,
    "byol/imagenet_resnet50": True,  # BYOL networks.py (haiku BlockV1): the last BN's scale starts at zero
    "byol/cifar10_resnet18": False,  # solo-learn
    "byol/cifar100_resnet18": False,
    "simsiam_gsg/imagenet_resnet50_simsiam": True,  # SimSiam / GSG main_*.py: zero_init_residual=True
    "simsiam_gsg/imagenet_resnet50_simsiam_gsg": True,
    "simsiam_gsg/imagenet_resnet50_byol": True, "simsiam_gsg/imagenet_resnet50_byol_gsg": True,  # gsg/builder.py
    "simsiam_gsg/cifar10_resnet18_simsiam": False,  # lightly's ResNetGenerator: no zero init
    "simsiam_gsg/cifar10_resnet18_simsiam_gsg": False,
    "simsiam_gsg/cifar10_resnet18_byol": False,
    "simsiam_gsg/cifar10_resnet18_byol_gsg": False,
    "sdssl/mocov3_resnet50": True,  # SDSSL Sec. 4.6 gives no recipe: MoCo v3's ResNet-50 one
    "msbreg/stl10_resnet18_k4": True,  # MSBReg: no code; BYOL's (haiku) init, on which it is built
    "msbreg/stl10_resnet18_ln": True,
    "msbreg/imagenet100_resnet18_k2": True,
    "msbreg/imagenet100_resnet18_k4": True,
    "msbreg/imagenet100_resnet18_k8": True,
    "msbreg/imagenet_resnet50_k4": True,
}


def test_every_resnet_config_is_in_the_zero_init_table():
    resnet_configs = set()
    for path in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")):
        rel = os.path.relpath(path, os.path.join(ROOT, "configs"))[:-5]
        with open(path) as f:
            if any(line.strip() in ("arch: resnet18", "arch: resnet50") for line in f):
                resnet_configs.add(rel)
    assert resnet_configs == set(ZERO_INIT)


@pytest.mark.parametrize("relpath", sorted(ZERO_INIT))
def test_zero_init_residual_follows_the_authors(relpath):
    module, cfg = load(relpath)
    backbone = resnet_backbone(module, cfg, 32)
    last_bns = [getattr(block, "bn3", block.bn2) for layer in (backbone.layer1, backbone.layer2, backbone.layer3,
                                                              backbone.layer4) for block in layer]
    zero = [bool((bn.weight == 0).all()) for bn in last_bns]
    assert zero == [ZERO_INIT[relpath]] * len(last_bns)
    assert all(bool((m.weight != 0).all()) for m in backbone.modules()
               if isinstance(m, nn.BatchNorm2d) and not any(m is bn for bn in last_bns))


# ----- heads -----

@pytest.mark.parametrize("relpath, bias", [("byol/imagenet_resnet50", False),  # BYOL networks.py: with_bias=False
                                           ("byol/cifar10_resnet18", True),  # solo-learn: nn.Linear's default bias
                                           ("byol/cifar100_resnet18", True)])
def test_byol_resnet_heads(relpath, bias):
    module, cfg = load(relpath)
    model = module.build_model(cfg, 32)
    for head in (model.projector, model.predictor):
        assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
        assert (head[-1].bias is not None) == bias and head[0].out_features == 4096 and head[-1].out_features == 256


# ----- ViT-S head count: SDSSL's (DeiT / DINO) ViT-S has 6 heads, MoCo v3's 12 (see the config headers) -----

@pytest.mark.parametrize("relpath", sorted(os.path.relpath(p, os.path.join(ROOT, "configs"))[:-5]
                                           for p in glob.glob(os.path.join(ROOT, "configs", "*", "*vit_s*.yaml"))
                                           if "/eval/" not in p))
def test_vit_small_head_count(relpath):
    _, cfg = load(relpath)
    from_sdssl = relpath.startswith("sdssl/") or relpath in ("byol/imagenet_vit_small", "simclr/imagenet_vit_small")
    assert cfg.num_heads == (6 if from_sdssl else 12), relpath


# ----- augmentation recipes: every config's views, field by field -----

SIMCLR_CIFAR = dict(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.0,
                    solarize_p=0.0)  # SimCLR App. B.9: colour strength 0.5 (0.8s, 0.8s, 0.8s, 0.2s), no blur
SIMCLR_IMAGENET = dict(SIMCLR_CIFAR, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)  # App. A: s = 1, blur p 0.5


def byol_pair(crop_min=0.08, blur=True):  # BYOL Table 6 (MoCo v3 and SDSSL use it): asymmetric blur and solarize
    view = dict(crop_scale=(crop_min, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
    return [dict(view, blur_p=1.0 if blur else 0.0, solarize_p=0.0), dict(view, blur_p=0.1 if blur else 0.0,
                                                                         solarize_p=0.2)]


def mocov2(crop_min, blur):  # MoCo v2 / SimSiam (GSG App. B.1; B.2 for CIFAR-10: crop 0.08-1, no blur)
    return [dict(crop_scale=(crop_min, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                 blur_p=0.5 if blur else 0.0, solarize_p=0.0)]


MSBREG = [dict(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=1.0,
               solarize_p=0.2)]  # MSBReg Table 9, one recipe for all views (crop scale not given: BYOL's)
RECIPES = {
    "simclr/cifar10_resnet18": [SIMCLR_CIFAR], "simclr/imagenet_resnet50": [SIMCLR_IMAGENET],
    "simclr/imagenet_vit_small": byol_pair(),  # SDSSL's SimCLR baseline: the BYOL / MoCo v3 pair
    "mocov3/imagenet_vit_small": byol_pair(), "mocov3/imagenet_vit_base": byol_pair(),
    "mocov3/imagenet_resnet50": byol_pair(0.2),  # CONFIG.md: --crop-min=.2 for ResNet-50
    "mocov3/cifar10_resnet18": byol_pair(blur=False), "mocov3/cifar100_resnet18": byol_pair(blur=False),  # solo-learn
    "byol/imagenet_resnet50": byol_pair(), "byol/imagenet_vit_small": byol_pair(),
    "byol/cifar10_resnet18": byol_pair(blur=False), "byol/cifar100_resnet18": byol_pair(blur=False),
    "simsiam_gsg/imagenet_resnet50_simsiam": mocov2(0.2, True),
    "simsiam_gsg/imagenet_resnet50_simsiam_gsg": mocov2(0.2, True),
    "simsiam_gsg/imagenet_resnet50_byol": mocov2(0.2, True),  # GSG's main_pretrain.py: one augmentation for all
    "simsiam_gsg/imagenet_resnet50_byol_gsg": mocov2(0.2, True),
    **{f"simsiam_gsg/cifar10_resnet18_{m}": mocov2(0.08, False) for m in ("simsiam", "simsiam_gsg", "byol",
                                                                         "byol_gsg")},
    **{f"msbreg/{c}": MSBREG for c in ("stl10_resnet18_k4", "stl10_resnet18_ln", "imagenet100_resnet18_k2",
                                       "imagenet100_resnet18_k4", "imagenet100_resnet18_k8", "imagenet_resnet50_k4")},
    **{os.path.relpath(p, os.path.join(ROOT, "configs"))[:-5]: byol_pair()  # SDSSL Sec. 4.1: MoCo v3's pair
       for p in glob.glob(os.path.join(ROOT, "configs", "sdssl", "*_vit_*.yaml"))},
    "sdssl/mocov3_resnet50": byol_pair(0.2),
    "ifaclr/imagenet_vit_small": [SIMCLR_IMAGENET], "ifaclr/cifar10_vit": [SIMCLR_IMAGENET],  # prototype
    # The Fashion-MNIST CPU recipes (their headers say why): crops from 0.2 of the image, no blur where the script
    # has the switch; jitter's saturation and hue are no-ops on grey images.
    "simclr/fashion_mnist_cpu": [dict(SIMCLR_CIFAR, crop_scale=(0.2, 1.0))],
    "ifaclr/fashion_mnist_cpu": [dict(SIMCLR_CIFAR, crop_scale=(0.2, 1.0))],
    "mocov3/fashion_mnist_cpu": byol_pair(0.2, blur=False), "byol/fashion_mnist_cpu": byol_pair(0.2, blur=False),
    **{f"simsiam_gsg/fashion_mnist_cpu_{m}": mocov2(0.2, False) for m in ("simsiam", "simsiam_gsg", "byol_gsg")},
    "msbreg/fashion_mnist_cpu": [dict(MSBREG[0], crop_scale=(0.2, 1.0))],
    "sdssl/fashion_mnist_cpu": byol_pair(0.2), "sdssl/fashion_mnist_cpu_plain": byol_pair(0.2),
    # the claims table's SSL protocols: the Fashion-MNIST recipes of their scripts
    "claims/c1_simsiam_stop_grad": mocov2(0.2, False), "claims/c4_gsg": mocov2(0.2, False),
    "claims/c2_simclr_head": [dict(SIMCLR_CIFAR, crop_scale=(0.2, 1.0))],
    "claims/c7_ifaclr": [dict(SIMCLR_CIFAR, crop_scale=(0.2, 1.0))],
    "claims/c3_sdssl_mocov3": byol_pair(0.2), "claims/c5_msbreg": [dict(MSBREG[0], crop_scale=(0.2, 1.0))],
}


def test_every_ssl_config_is_in_the_recipe_table():
    ssl = {os.path.relpath(p, os.path.join(ROOT, "configs"))[:-5]
           for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))
           if os.path.basename(os.path.dirname(p)) not in ("ifacd_distill", "eval")
           and CLAIM_SCRIPTS.get(os.path.relpath(p, os.path.join(ROOT, "configs"))[:-5]) != "ifacd_distill"}
    assert ssl == set(RECIPES)


@pytest.mark.parametrize("relpath", sorted(RECIPES))
def test_view_recipes_follow_the_papers(relpath):
    module, cfg = load(relpath)
    recipes = module.view_recipes(cfg, 64)
    assert len(recipes) == len(RECIPES[relpath])
    for recipe, expected in zip(recipes, RECIPES[relpath]):
        assert recipe.flip == 0.5 and recipe.blur_sigma == (0.1, 2.0) and recipe.blur_kernel == 7  # 10% of 64, odd
        for key, value in expected.items():
            assert getattr(recipe, key) == pytest.approx(value), (relpath, key)


def test_jitter_orders_are_uniform_over_the_24_permutations():
    """torchvision's ColorJitter applies its four ops in randperm(4) order, drawn per image: each of the 24 orders
    about equally often (chi-square, 23 degrees of freedom), and images left alone with probability 1 - p."""
    from common import batch_augment as B
    torch.manual_seed(0)
    order, factors = B.jitter_params(48000, (0.4, 0.4, 0.4, 0.1), p=0.8)
    counts = torch.bincount(order, minlength=25).double()
    applied = counts[:24]
    chi2 = float(((applied - applied.mean()) ** 2 / applied.mean()).sum())
    assert chi2 < 60, chi2  # P(chi2_23 > 60) < 1e-4
    assert abs(counts[24] / 48000 - 0.2) < 0.01
    assert sorted(set(B.ORDERS)) == sorted(__import__("itertools").permutations(range(4)))
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.6, 0.6, -0.1]), atol=1e-3)
    assert torch.allclose(hi, torch.tensor([1.4, 1.4, 1.4, 0.1]), atol=1e-3)
