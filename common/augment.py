"""The standard SSL augmentation recipes, declared once as `Recipe`s, the view wrappers and
ViewMaker.

- simclr_recipe: SimCLR (Chen et al. 2020, App. A): random resized crop, flip, colour jitter of
  strength s (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (off for
  CIFAR, App. B.9).
- byol_recipes: BYOL / MoCo v3 asymmetric views (Grill et al. 2020, Table 6): jitter (0.4, 0.4, 0.2,
  0.1), blur p 1.0 / 0.1, solarize p 0 / 0.2.
- mocov2_recipe: MoCo v2 / SimSiam: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5,
  flip.
Blur kernels are 10% of the image side (odd), sigma uniform in [0.1, 2.0], all via torchvision's own
ops.
Each recipe is a `Recipe`: `to_torchvision` builds the PIL version, common/batch_augment.py the
batched one.
"""
from dataclasses import dataclass
from functools import lru_cache

import torch
import torchvision.transforms as T

from common.batch_augment import adjust_hue, augment_batch
from common.config import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation, declared once and built two ways: `to_torchvision` (PIL, in loader
    workers) and common.batch_augment.augment_batch (batched tensor ops on the training device).
    Order: crop, flip, jitter, grayscale, blur, solarize, normalise (flip commutes with the rest, so
    MoCo v2's flip-last is the same)."""
    size: int
    crop_scale: tuple = (0.08, 1.0)
    flip: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def blur_kernel(self):  # 10% of the image side, odd (SimCLR App. A)
        return max(3, int(0.1 * self.size) // 2 * 2 + 1)


def _finish(mean, std):
    return [T.ToTensor(), T.Normalize(mean, std)]


def to_torchvision(r):
    ops = [T.RandomResizedCrop(r.size, scale=r.crop_scale), T.RandomHorizontalFlip(r.flip),
           T.RandomApply([T.ColorJitter(*r.jitter)], p=r.jitter_p), T.RandomGrayscale(p=r.gray_p)]
    if r.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(r.blur_kernel, sigma=r.blur_sigma)], p=r.blur_p))
    if r.solarize_p > 0:
        ops.append(T.RandomSolarize(128, p=r.solarize_p))
    return T.Compose(ops + _finish(r.mean, r.std))


def simclr_recipe(image_size, strength=1.0, blur=True, crop_min=0.08):
    s = strength
    return Recipe(image_size, (crop_min, 1.0), jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                  blur_p=0.5 if blur else 0.0)


def byol_recipes(image_size, crop_min=0.08, blur=True):
    """The two asymmetric views (view 1: always blurred; view 2: rarely blurred, sometimes
    solarised).
    blur=False drops the blur (solo-learn's CIFAR recipes)."""
    return (Recipe(image_size, (crop_min, 1.0), blur_p=1.0 if blur else 0.0, solarize_p=0.0),
            Recipe(image_size, (crop_min, 1.0), blur_p=0.1 if blur else 0.0, solarize_p=0.2))


def mocov2_recipe(image_size, crop_min=0.2, blur=True):
    return Recipe(image_size, (crop_min, 1.0), jitter=(0.4, 0.4, 0.4, 0.1),
                  blur_p=0.5 if blur else 0.0)


def to_float(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W) on the images' device: eval_transform for
    images already at the evaluated size (ToTensor + Normalize), as one tensor op instead of a PIL
    round trip per image."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - m) / s


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="short",
                   interpolation="bilinear"):
    """Evaluation: resize the short side to image_size/0.875 and centre-crop (ImageNet protocol);
    images already at image_size (CIFAR at 32, STL-10 at 96) pass through unchanged. resize='square'
    resizes both sides to that size first (GSG's k-NN: Resize((256, 256)), then CenterCrop(224));
    interpolation 'bicubic' is DINO's eval transform."""
    side = round(image_size / 0.875) if image_size > 96 else image_size
    mode = {"bilinear": T.InterpolationMode.BILINEAR,
            "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    size = {"short": side, "square": (side, side)}[resize]
    return T.Compose([T.Resize(size, interpolation=mode), T.CenterCrop(image_size)]
                     + _finish(mean, std))


def linear_train_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Linear-probe training augmentation: random resized crop + flip (MoCo v3 / DINO protocol);
    small images (CIFAR, STL-10) use the usual pad-and-crop + flip instead."""
    crop = (T.RandomResizedCrop(image_size) if image_size > 96
            else T.RandomCrop(image_size, padding=image_size // 8))
    return T.Compose([crop, T.RandomHorizontalFlip()] + _finish(mean, std))


class TwoViews:
    """Two views of one image: (t1(x), t2(x)); t2 defaults to t1 (symmetric recipes)."""

    def __init__(self, t1, t2=None):
        self.t1, self.t2 = t1, t2 or t1

    def __call__(self, x):
        return self.t1(x), self.t2(x)


class MultiViews:
    """k views of one image; with a list of transforms, view i uses
    transforms[i % len(transforms)]."""

    def __init__(self, transforms, k):
        self.transforms = transforms if isinstance(transforms, (list, tuple)) else [transforms]
        self.k = k

    def __call__(self, x):
        return [self.transforms[i % len(self.transforms)](x) for i in range(self.k)]


# datasets held as uint8 tensors (common.data.ArrayDataset)
IN_MEMORY = ("cifar10", "cifar100", "stl10", "fashion_mnist", "mnist", "fake")


class ViewMaker:
    """Makes the training views of a batch, on the training device.

    aug_device 'cpu': torchvision on PIL images in the loader workers (`transform` goes to the
    dataset); calling the ViewMaker moves the views to the device. 'gpu': the dataset yields uint8
    images and the views are made here as batched tensor ops on the training device
    (common/batch_augment.py; on a CPU device this runs on the CPU, which tests and benchmarks use).
    'auto': batched on CUDA for in-memory datasets, torchvision otherwise.
    View i uses recipes[i % len(recipes)]. `compiled` fuses the hue rotation with torch.compile (the
    costliest op).
    """

    def __init__(self, recipes, num_views, device, aug_device, dataset, compiled=False,
                 channels_last=False):
        if aug_device == "auto":
            aug_device = "gpu" if device.type == "cuda" and dataset in IN_MEMORY else "cpu"
        if aug_device == "gpu" and dataset not in IN_MEMORY:
            raise ConfigError(f"aug_device=gpu needs an in-memory dataset "
                              f"({', '.join(IN_MEMORY)}); {dataset} is decoded from files: use "
                              f"aug_device cpu")
        self.recipes, self.num_views, self.device = list(recipes), num_views, device
        self.batched, self.compiled = aug_device == "gpu", compiled
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def transform(self):
        """What the dataset applies per image: the torchvision views, or nothing (raw uint8) when
        batched."""
        if self.batched:
            return None
        return MultiViews([to_torchvision(r) for r in self.recipes], self.num_views)

    def __call__(self, batch):
        """batch: the loader's images (a list of view tensors, or uint8 (B, H, W, 3)) -> list of
        views on device."""
        if not self.batched:
            return [v.to(self.device, non_blocking=True)
                    .contiguous(memory_format=self.memory_format) for v in batch]
        images = batch.to(self.device, non_blocking=True)
        hue = compiled_hue() if self.compiled else None
        views = [augment_batch(images, self.recipes[i % len(self.recipes)], hue)
                 for i in range(self.num_views)]
        return [v.contiguous(memory_format=self.memory_format) for v in views]


@lru_cache(maxsize=1)
def compiled_hue():
    return torch.compile(adjust_hue, dynamic=True)
