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
from helpers import ROOT

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
def test_zero_init_residual_follows_the_authors(relpath, monkeypatch):
    for name in ("kaiming_normal_", "kaiming_uniform_"):  # the conv weights' init: this test reads BN weights only
        monkeypatch.setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
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
    "claims/c1b_simsiam_stop_grad_600_steps": mocov2(0.2, False),
    "claims/c1c_simsiam_stop_grad_constant_lr": mocov2(0.2, False),
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


# ----- Config defaults: `python <script>.py` with no config trains on the dataclass -----
# The tables above pin the YAMLs; these pin the defaults, field by field. Every Config field is in
# exactly one place: PLUMBING (no paper gives it), PAPER_DEFAULTS (value, source) or NOT_THE_PAPERS
# (value, why it deliberately differs). A new field, or a changed default, fails here until the
# table says where its value comes from.

PLUMBING = {  # where the data and outputs are, how fast and how often: no paper constant
    "data_dir", "download", "aug_device", "output_dir", "seed", "device", "num_workers",
    "max_steps_per_epoch", "eval_every", "knn_bank", "log_every", "save_every", "config", "resume",
    "compile", "class_list", "teacher_ckpt", "train_subset",
    "image_size",  # 0 = the dataset's native size (32 CIFAR, 96 STL-10, 224 ImageNet)
}
BF16 = ("bf16", "bf16 autocast on CUDA, for speed (the docstring's deviation; --amp none = fp32)")
ARCH_HEADS = (0, "0 = the arch's heads (vit_small: 12); the ViT configs set the paper's")
VIT_STEM = {  # the ViT fields of the scripts whose default backbone is a ResNet: MoCo v3's / SDSSL's
    "patch_size": (16, "SDSSL's ViT-S/16 baseline (Table 1), MoCo v3's patch"),
    "freeze_patch_embed": (True, "MoCo v3 Sec. 4.2 --stop-grad-conv1, kept by SDSSL Sec. 4.1")}

PAPER_DEFAULTS = {
    "simclr": {  # CIFAR-10 ResNet-18: SimCLR App. B.9, google-research/simclr README CIFAR-10 command
        "dataset": ("cifar10", "README: --dataset=cifar10"),
        "crop_min": (0.08, "App. A: random crop of 0.08-1 of the area"),
        "color_strength": (0.5, "README: --color_jitter_strength=0.5 (App. B.9)"),
        "blur": (False, "README: --use_blur=False (App. B.9: no blur on CIFAR-10)"),
        "aug": ("simclr", "Sec. 3 / App. A: the same recipe for both views"),
        "arch": ("resnet18", "README: --resnet_depth=18, CIFAR stem (App. B.9)"),
        "zero_init_residual": (True, "TF resnet.py: batch_norm_relu(init_zero=True)"),
        "proj_hidden_dim": (512, "TF code: the head's hidden width is the backbone's (R18: 512)"),
        "proj_dim": (128, "run.py --proj_out_dim 128 (App. B.4)"),
        "proj_layers": (2, "Sec. 2.1: an MLP with one hidden layer"),
        "sync_bn": (True, "Sec. 2.2: global BN"),
        "temperature": (0.5, "README: --temperature=0.5 (App. B.9)"),
        "sum_directions": (True, "TF objective.py: loss_a + loss_b"),
        "optimizer": ("lars", "Sec. 2.2: LARS"),
        "lr": (1.0, "README: --learning_rate=1.0, linear scaling (x B/256)"),
        "weight_decay": (1e-4, "README (since SimCLRv2): --weight_decay=1e-4; the first: 1e-6"),
        "exclude_bias_norm": (True, "TF LARS: exclude_from_weight_decay batch_normalization, bias"),
        "warmup_epochs": (10, "run.py --warmup_epochs 10 (Sec. B.1)"),
        "epochs": (1000, "README: --train_epochs=1000"),
        "batch_size": (512, "README: --train_batch_size=512"),
        **VIT_STEM,
    },
    "mocov3": {  # ViT-S/16, 1 node: moco-v3 CONFIG.md, main_moco.py, builder.py
        "dataset": ("imagenet", "CONFIG.md"), "arch": ("vit_small", "CONFIG.md: vit_small"),
        "crop_min": (0.08, "main_moco.py --crop-min 0.08 (ViT)"),
        "blur": (True, "main_moco.py: BYOL's asymmetric blur 1.0 / 0.1"),
        "patch_size": (16, "vits.py vit_small: patch 16"),
        "freeze_patch_embed": (True, "CONFIG.md --stop-grad-conv1 (Sec. 4.2)"),
        "zero_init_residual": (True, "main_moco.py: resnet50(zero_init_residual=True)"),
        "proj_hidden_dim": (4096, "--mlp-dim 4096"), "proj_dim": (256, "--moco-dim 256"),
        "pred_hidden_dim": (4096, "--mlp-dim 4096 (builder.py predictor)"),
        "sync_bn": (True, "main_moco.py: SyncBatchNorm"),
        "temperature": (0.2, "CONFIG.md ViT: --moco-t=.2"),
        "base_momentum": (0.99, "main_moco.py --moco-m 0.99, --moco-m-cos"),
        "optimizer": ("adamw", "CONFIG.md ViT: --optimizer=adamw"),
        "lr": (1.5e-4, "CONFIG.md ViT: --lr=1.5e-4"),
        "weight_decay": (0.1, "CONFIG.md ViT: --weight-decay=.1"),
        "exclude_bias_norm": (False, "main_moco.py: AdamW over model.parameters()"),
        "warmup_epochs": (40, "CONFIG.md ViT: --warmup-epochs=40"),
        "epochs": (300, "CONFIG.md ViT: --epochs=300"),
        "batch_size": (1024, "CONFIG.md ViT-S 1-node: -b 1024"),
        "lars_eta": (0.001, "optimizer.py LARS trust_coefficient 0.001"),
        "lars_clip": (False, "optimizer.py LARS: no clipping"),
        "num_heads": (0, "0 = vit_small's 12 heads, MoCo v3's vits.py (checked below)"),
    },
    "byol": {  # ImageNet ResNet-50: BYOL Sec. 3.3, App. B, Table 6; networks.py
        "dataset": ("imagenet", "Sec. 3.3"), "arch": ("resnet50", "Sec. 3.3"),
        "crop_min": (0.08, "Table 6: random crop 0.08-1"), "blur": (True, "Table 6: p 1.0 / 0.1"),
        "zero_init_residual": (True, "networks.py (haiku BlockV1): the last BN's scale at 0"),
        "proj_hidden_dim": (4096, "Sec. 3.3: 4096"), "proj_dim": (256, "Sec. 3.3: 256"),
        "pred_hidden_dim": (4096, "Sec. 3.3: the predictor as the projector"),
        "last_bias": (False, "networks.py: hk.Linear(output_size, with_bias=False)"),
        "sync_bn": (True, "App. B: BN over the global batch"),
        "base_momentum": (0.996, "Sec. 3.3: tau_base = 0.996"),
        "optimizer": ("lars", "Sec. 3.3: LARS"),
        "lr": (0.2, "Sec. 3.3: 0.2 x BatchSize / 256"),
        "weight_decay": (1.5e-6, "Sec. 3.3: 1.5e-6"),
        "exclude_bias_norm": (True, "Sec. 3.3: biases and BN excluded from wd and LARS"),
        "warmup_epochs": (10, "Sec. 3.3: 10 warmup epochs"), "epochs": (1000, "Sec. 3.3"),
        "batch_size": (4096, "Sec. 3.3: 4096"),
        "lars_eta": (0.001, "LARS (You et al.) trust coefficient 1e-3, as BYOL's code"),
        "lars_clip": (False, "BYOL's LARS: no clipping"),
        **VIT_STEM,
    },
    "simsiam_gsg": {  # ImageNet R50 SimSiam-GSG: GSG App. B.1, C.1, main_pretrain.py; SimSiam
        "dataset": ("imagenet", "App. B.1"), "arch": ("resnet50", "App. C.1"),
        "crop_min": (0.2, "App. B.1: MoCo v2's crop 0.2-1"), "blur": (True, "App. B.1: p 0.5"),
        "base": ("simsiam", "main_pretrain.py --model simsiam_gsg"),
        "gsg": (True, "Alg. 1 (README: --model simsiam_gsg)"),
        "stop_grad": (True, "SimSiam Alg. 1: stop-gradient on z"),
        "ema_momentum": (0.99, "gsg/builder.py BYOL: m = 0.99, constant"),
        "zero_init_residual": (True, "main_simsiam.py: zero_init_residual=True"),
        "proj_hidden_dim": (2048, "App. C.1: 2048"), "proj_dim": (2048, "App. C.1: 2048"),
        "proj_layers": (3, "App. C.1: three FC layers"),
        "pred_hidden_dim": (512, "App. C.1: 2048 -> 512 -> 2048"),
        "sync_bn": (True, "main_simsiam.py: SyncBatchNorm"),
        "lr": (0.05, "SimSiam Sec. 4: 0.05 x B / 256"), "momentum": (0.9, "SimSiam: SGD 0.9"),
        "weight_decay": (1e-4, "SimSiam: 1e-4"),
        "exclude_bias_norm": (False, "main_simsiam.py: wd on every parameter"),
        "fix_pred_lr": (True, "GSG / SimSiam README: --fix-pred-lr"),
        "warmup_epochs": (0, "SimSiam: no warmup"), "epochs": (100, "main_pretrain.py: 100"),
        "lr_schedule": ("cosine", "main_simsiam.py adjust_learning_rate: cosine per epoch"),
        "batch_size": (512, "main_pretrain.py: -b 512"),
        "amp": ("none", "the authors' fp32"),
    },
    "sdssl": {  # SD-MoCo v3 ViT-S/16: SDSSL Sec. 4.1, Table 1, hagiss/SDSSL SD_moco.json
        "framework": ("mocov3", "Table 1: SD-MoCo v3"),
        "alpha_max": (1.0, "Sec. 4.1: alpha cosine 0 ~ 1.0; SD_moco.json ratio 1"),
        "alpha_schedule": ("cosine", "Sec. 4.1: cosine scheduling of alpha"),
        "beta": (1.0, "Eq. 6"), "pred_loss": (True, "Eq. 5-6: L_pred"),
        "isd_every": (1, "Sec. 3: a head on every block"),
        "isd_head": ("mlp3", "NetWrapper: 3-layer intermediate projectors"),
        "temperature": (0.2, "MoCo v3's tau, hard-coded 0.2 in the authors' code"),
        "base_momentum": (0.996, "SD_moco.json momentum_teacher 0.996"),
        "dataset": ("imagenet", "Table 1"), "crop_min": (0.08, "MoCo v3's 0.08"),
        "arch": ("vit_small", "Table 1: ViT-S/16"), "patch_size": (16, "Table 1: S/16"),
        "freeze_patch_embed": (True, "Sec. 4.1: MoCo v3's frozen patch projection"),
        "zero_init_residual": (True, "Table 7's ResNet-50: MoCo v3's zero_init_residual"),
        "proj_hidden_dim": (4096, "SD_moco.json mlp_hidden 4096"),
        "isd_hidden_dim": (2048, "NetWrapper: 2048 for blocks 1-11"),
        "proj_dim": (256, "SD_moco.json out_dim 256"),
        "pred_hidden_dim": (4096, "SD_moco.json mlp_hidden 4096"),
        "sync_bn": (True, "MoCo v3's SyncBN"),
        "optimizer": ("adamw", "Sec. 4.1: AdamW"),
        "lr": (1.5e-4, "Sec. 4.1: 1.5e-4 (MoCo v3, BYOL)"),
        "weight_decay": (0.1, "Sec. 4.1: 0.1"),
        "exclude_bias_norm": (True, "the authors' utils.get_params_groups"),
        "warmup_epochs": (40, "Sec. 4.1: 40"), "epochs": (300, "Table 1: 300"),
        "batch_size": (1024, "Sec. 4.1: 1024 for ViT-S/16"),
    },
    "msbreg": {  # STL-10, ResNet-18, K = 4: MSBReg Table 1, Sec. 7.1-7.2, Table 11
        "dataset": ("stl10", "Table 1"), "num_views": (4, "Table 1: K = 4"),
        "arch": ("resnet18", "Sec. 7.2"), "proj_hidden_dim": (512, "Sec. 7.2: 512"),
        "proj_dim": (128, "Sec. 7.2: 128"), "head_norm": ("bn", "Sec. 7.2: BN"),
        "sync_bn": (True, "BN over the global batch (BYOL's)"),
        "centroid": ("all", "Eq. 3 as written"),
        "lambda_s": (4e-3, "Sec. 4.5 / Table 11: lambda_w = 4e-3"),
        "lambda_b": (0.5, "Sec. 4.5 / Table 11: lambda_b = 0.5"),
        "lr": (0.5, "Sec. 7.1: base lr 0.5 for STL-10"), "weight_decay": (1e-5, "Sec. 7.1"),
        "warmup_epochs": (10, "Sec. 7.1: 10"), "epochs": (320, "Sec. 7.1: 320"),
        "batch_size": (512, "Sec. 7.1: 512"),
        # not given by the paper: BYOL's values (the YAML header, METHODS.md section 7)
        "crop_min": (0.08, "not given: BYOL's 0.08"),
        "zero_init_residual": (True, "not given: BYOL's init"),
        "target_decay": (0.996, "not given: BYOL's tau_base 0.996"),
    },
    "ifaclr": {  # the prototype, arkel23/layerwiseclr at c42438b (lit_*.py, heads.py, loaders.py)
        "method": ("lwclr", "the slides' appendix A: lwclr"),
        "layers": (2, "--cont_layers_range 2"),
        "detach_layers": (True, "lwclr: MultiScaleToSingleScaleHead(detach=True)"),
        "temperature": (0.5, "--temperature 0.5"),
        "crop_min": (0.08, "SimCLR's crop 0.08-1"),
        "color_strength": (1.0, "jitter 0.8, 0.8, 0.8, 0.2: SimCLR's s = 1"),
        "blur": (True, "blur p 0.5"), "patch_size": (16, "B_16: patch 16"),
        "freeze_patch_embed": (False, "the prototype trains the patch projection"),
        "head": ("prototype", "heads.py ProjectionMLPHead"),
        "head_norm": ("ln", "heads.py: LayerNorm (--bn_proj off)"),
        "proj_layers": (3, "--no_proj_layers 3"), "proj_hidden_dim": (2048, "2048"),
        "proj_dim": (2048, "--projector_output_size 2048"),
        "optimizer": ("sgd", "--optimizer momentum: SGD 0.9"),
        "lr": (1.2e-3, "--learning_rate 3e-4 at batch 64 = 1.2e-3 per 256"),
        "weight_decay": (0.0, "--weight_decay 0"), "batch_size": (64, "--batch_size 64"),
        "exclude_bias_norm": (False, "SGD over self.parameters()"),
        "clip_grad_norm": (1.0, "gradient_clip_val=1.0"),
        "amp": ("none", "precision=32"),
    },
    "ifacd_distill": {  # S000 "Experiments"; the IFACD fork 62a53e7; RepDistiller (METHODS.md 8-9)
        "dataset": ("cifar100", "S000: CIFAR-100"), "distill": ("ifacd", "S000"),
        "student": ("wrn_16_2", "S000 column 1: wrn_40_2 -> wrn_16_2"),
        "teacher": ("wrn_40_2", "S000 column 1"),
        "alpha": (1.0, "S000: alpha = 1"), "beta": (1.0, "S000: beta = 1"),
        "kd_temperature": (4.0, "RepDistiller --kd_T 4"),
        "nce_temperature": (0.07, "the fork's nce_t 0.07"),
        "feat_dim": (128, "RepDistiller / the fork: feat_dim 128"),
        "ifacd_layers": (2, "the fork: cont_no_l 2 (ifacd2)"),
        "crd_negatives": (16384, "RepDistiller nce_k 16384"),
        "crd_momentum": (0.5, "RepDistiller nce_m 0.5"),
        "crd_mode": ("exact", "RepDistiller --mode exact"),
        "init_epochs": (30, "RepDistiller helper/pretrain.py: 30 epochs"),
        "hint_layer": (2, "RepDistiller --hint_layer 2"),
        "sync_bn": (False, "one GPU"),
        "lr": (0.05, "S000: LR 0.05"), "momentum": (0.9, "SGD 0.9"),
        "nesterov": (True, "the fork: timm's SGD, Nesterov"),
        "weight_decay": (5e-4, "S000: WD 5e-4"),
        "exclude_bias_norm": (True, "the fork: timm excludes biases and BN"),
        "lr_milestones": ([150, 180, 210], "S000: step LR (150, 180, 210)"),
        "lr_decay": (0.1, "RepDistiller lr_decay_rate 0.1"),
        "epochs": (240, "S000: 240 epochs"), "batch_size": (64, "RepDistiller / the fork: 64"),
        "amp": ("none", "fp32"),
    },
}
NOT_THE_PAPERS = {  # field: (default, why the default is deliberately not the paper's value)
    "simclr": {"amp": BF16, "num_heads": ARCH_HEADS},
    "mocov3": {"amp": BF16},  # the official code: fp16 with a GradScaler
    "byol": {"amp": BF16, "num_heads": ARCH_HEADS},
    "simsiam_gsg": {
        "knn_temperature": (0.07, "the training monitor's (DINO's, as every script); GSG's own "
                                  "k-NN protocol (T 0.2) is configs/eval/knn_gsg.yaml"),
    },
    "sdssl": {
        "amp": (BF16[0], "bf16 autocast for speed; the authors' fp32 (use_fp16 false): --amp none"),
        "num_heads": (0, "0 = the arch's heads (vit_small 12, vit_base 12), one default for every "
                         "arch; the authors' ViT-S has 6, which every SDSSL ViT-S config sets "
                         "(test_vit_small_head_count): `python sdssl.py` alone trains 12 heads"),
    },
    "msbreg": {"amp": (BF16[0], "bf16 autocast for speed; the paper does not give a precision")},
    "ifaclr": {
        "dataset": ("imagenet", "the prototype's parser says cifar10 (at 224 px); the defaults are "
                                "the ImageNet run of configs/ifaclr/imagenet_vit_small.yaml"),
        "arch": ("vit_small", "the prototype trains pytorch_pretrained_vit's B_16; ViT-S here "
                              "(the YAML headers)"),
        "num_heads": (0, "vit_small's 12 (MoCo v3's); the prototype's B_16 has 12"),
        "warmup_epochs": (1, "whole epochs for the prototype's 1000 warmup steps (docstring)"),
        "epochs": (100, "the prototype documents no run length"),
        "sync_bn": (True, "no prototype value (its heads have LayerNorm): BN heads (--head_norm "
                          "bn) normalise over the global batch, as in the other scripts"),
    },
    "ifacd_distill": {
        "gamma": (0.8, "S000 gives no gamma; RepDistiller's CRD weight (-b 0.8), as for ifacd"),
    },
}


def dataclass_defaults(name):
    module = importlib.import_module(name)
    return config.parse(module.Config, [])


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_every_config_field_is_classified(name):
    fields = set(vars(dataclass_defaults(name)))
    paper, deviation = set(PAPER_DEFAULTS[name]), set(NOT_THE_PAPERS[name])
    assert not paper & deviation and not (paper | deviation) & PLUMBING
    assert fields - PLUMBING == paper | deviation, "classify every Config field in one table"


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_config_defaults_are_the_paper_constants(name):
    cfg = dataclass_defaults(name)
    wrong = {field: (getattr(cfg, field), value, source)
             for field, (value, source) in {**PAPER_DEFAULTS[name], **NOT_THE_PAPERS[name]}.items()
             if getattr(cfg, field) != value or type(getattr(cfg, field)) is not type(value)}
    assert not wrong, f"{name}: field: (default, expected, source) {wrong}"


def test_vit_small_default_heads_are_moco_v3s():
    """num_heads 0 resolves to the arch's heads: vit_small 12 (MoCo v3's vits.py; DeiT-S has 6)."""
    from common import models
    assert models.BACKBONES["vit_small"]["num_heads"] == 12
