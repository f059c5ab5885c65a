"""The standard SSL augmentation recipes, as torchvision transforms on PIL images, and view wrappers.

- simclr_transform: SimCLR (Chen et al. 2020, App. A): random resized crop, flip, colour jitter of strength s
  (0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (off for CIFAR, App. B.9).
- byol_pair: BYOL / MoCo v3 asymmetric views (Grill et al. 2020, Table 6): jitter (0.4, 0.4, 0.2, 0.1), blur p 1.0 /
  0.1, solarize p 0 / 0.2.
- mocov2_transform: MoCo v2 / SimSiam: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5, flip.
Blur kernels are 10% of the image side (odd), sigma uniform in [0.1, 2.0], all via torchvision's own ops.
"""
import torchvision.transforms as T

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _blur(image_size, p):
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _finish(mean, std):
    return [T.ToTensor(), T.Normalize(mean, std)]


def simclr_transform(image_size, strength=1.0, blur=True, crop_min=0.08, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    s = strength
    ops = [T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
           T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(_blur(image_size, 0.5))
    return T.Compose(ops + _finish(mean, std))


def byol_pair(image_size, crop_min=0.08, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The two asymmetric view transforms (view 1: always blurred; view 2: rarely blurred, sometimes solarised)."""
    def view(blur_p, solarize_p):
        return T.Compose([T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
                          T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                          T.RandomGrayscale(p=0.2),
                          _blur(image_size, blur_p),
                          T.RandomSolarize(128, p=solarize_p)] + _finish(mean, std))
    return view(1.0, 0.0), view(0.1, 0.2)


def mocov2_transform(image_size, crop_min=0.2, blur=True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    ops = [T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(_blur(image_size, 0.5))
    return T.Compose(ops + [T.RandomHorizontalFlip()] + _finish(mean, std))


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Evaluation: resize the short side to image_size/0.875 and centre-crop (ImageNet protocol); images already at
    image_size (CIFAR at 32, STL-10 at 96) pass through unchanged."""
    return T.Compose([T.Resize(round(image_size / 0.875)) if image_size > 96 else T.Resize(image_size),
                      T.CenterCrop(image_size)] + _finish(mean, std))


def linear_train_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Linear-probe training augmentation: random resized crop + flip (MoCo v3 / DINO protocol); small images
    (CIFAR, STL-10) use the usual pad-and-crop + flip instead."""
    crop = T.RandomResizedCrop(image_size) if image_size > 96 else T.RandomCrop(image_size, padding=image_size // 8)
    return T.Compose([crop, T.RandomHorizontalFlip()] + _finish(mean, std))


class TwoViews:
    """Two views of one image: (t1(x), t2(x)); t2 defaults to t1 (symmetric recipes)."""

    def __init__(self, t1, t2=None):
        self.t1, self.t2 = t1, t2 or t1

    def __call__(self, x):
        return self.t1(x), self.t2(x)


class MultiViews:
    """k views of one image; with a list of transforms, view i uses transforms[i % len(transforms)]."""

    def __init__(self, transforms, k):
        self.transforms = transforms if isinstance(transforms, (list, tuple)) else [transforms]
        self.k = k

    def __call__(self, x):
        return [self.transforms[i % len(self.transforms)](x) for i in range(self.k)]
