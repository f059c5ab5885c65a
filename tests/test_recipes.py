"""Every shipped config's recipe constants, pinned to the paper or the authors' code in one table per topic.

The statistical tests build both augmentation pipelines from the same recipe, and the smoke runs take whatever a
config says, so a wrong constant in a recipe or a config changes no other test: these tables are where they are
checked. Each row names its source.
"""
import glob
import importlib
import os

import pytest
import torch
import torch.nn as nn

from common import config
from conftest import ROOT


def load(relpath, *flags):
    """(script module, Config) for configs/<relpath>.yaml."""
    method = relpath.split("/")[0]
    module = importlib.import_module(method)
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
                                           for p in glob.glob(os.path.join(ROOT, "configs", "*", "*vit_s*.yaml"))))
def test_vit_small_head_count(relpath):
    _, cfg = load(relpath)
    from_sdssl = relpath.startswith("sdssl/") or relpath in ("byol/imagenet_vit_small", "simclr/imagenet_vit_small")
    assert cfg.num_heads == (6 if from_sdssl else 12), relpath
