"""The augmentation recipes of common/augment.py as batched tensor ops, for images held in memory (CIFAR, STL-10).

One call turns a uint8 batch (B, H, W, 3) into normalised float views (B, 3, S, S) on the batch's device, with
independent random parameters per image drawn exactly as torchvision draws them:
- random resized crop: torchvision's 10 attempts at (scale, log-ratio), then its central fallback; the crop is
  resized with roi_align (bilinear; averaged over the source pixels of each output pixel when shrinking);
- horizontal flip; colour jitter applied with probability p, brightness / contrast / saturation / hue each with its
  own factor, in a random order per image (torchvision's randperm(4)), clamping after each step as torchvision does;
- grayscale; Gaussian blur with a per-image sigma, reflect padding, the recipe's kernel size; solarize; normalise.
On a GPU this removes the CPU data pipeline as the bottleneck of small-image SSL (solo-learn needs DALI for that).
The random numbers come from torch's global RNG of that device, so per-epoch reseeding keeps runs reproducible.
"""
import itertools
import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision / PIL


def _uniform(n, low, high, device):
    return torch.rand(n, device=device) * (high - low) + low


def crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """(n, 4) boxes x1, y1, x2, y2 in pixels, sampled as torchvision's RandomResizedCrop.get_params, batched."""
    area = height * width
    target = area * _uniform(n * 10, scale[0], scale[1], device).view(n, 10)
    aspect = torch.exp(_uniform(n * 10, math.log(ratio[0]), math.log(ratio[1]), device)).view(n, 10)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)  # the first attempt that fits, as torchvision's loop
    pick = first.clamp(min=0)[:, None]
    w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    # Fallback (no attempt fit): the largest central crop with the ratio clamped into range.
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    fallback = first < 0
    w, h = torch.where(fallback, float(fw), w), torch.where(fallback, float(fh), h)
    # torch.randint(0, H - h + 1) per image; the fallback crop is centred.
    i = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    j = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    i = torch.where(fallback, torch.floor((height - h) / 2), i)
    j = torch.where(fallback, torch.floor((width - w) / 2), j)
    return torch.stack([j, i, j + w, i + h], dim=1)


def resized_crops(x, boxes, size, flip=None):
    """Crop each image of (n, 3, H, W) to its box and resize to size x size, bilinear. When every crop is enlarged
    (output size >= image size: CIFAR at 32, STL-10 at 96) grid_sample gives exactly crop-then-bilinear-resize;
    otherwise roi_align averages the source pixels of each output pixel, as an antialiased resize does (it may
    read up to half a pixel beyond the crop's edge). `flip` (n,) bool mirrors those crops horizontally."""
    n, _, height, width = x.shape
    if size >= max(height, width):
        v = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size  # output pixel centres in [0, 1]
        x1, y1, x2, y2 = boxes[:, :, None].unbind(1)  # each (n, 1)
        # A mirrored crop samples its columns right to left (the flip costs nothing here); its rows keep their order.
        u = v if flip is None else torch.where(flip[:, None], 1.0 - v, v)  # (n, size) or (size,): columns only
        # Source positions in pixel-edge units, clamped to the crop's first and last pixel centres: resizing a
        # cropped image never reads outside the crop.
        px = torch.minimum(torch.maximum(x1 + u * (x2 - x1), x1 + 0.5), x2 - 0.5)  # (n, size)
        py = torch.minimum(torch.maximum(y1 + v * (y2 - y1), y1 + 0.5), y2 - 0.5)
        gx, gy = px * (2.0 / width) - 1, py * (2.0 / height) - 1  # grid_sample's [-1, 1] (align_corners=False)
        grid = torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rois = torch.cat([torch.arange(n, device=x.device, dtype=x.dtype)[:, None], boxes], dim=1)  # (n, 5)
    out = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out if flip is None else torch.where(flip[:, None, None, None], out.flip(-1), out)


def _grayscale(x):  # (n, 3, H, W) -> (n, 1, H, W)
    return (GRAY[0] * x[:, 0] + GRAY[1] * x[:, 1] + GRAY[2] * x[:, 2]).unsqueeze(1)


def _blend_(x, other, factor):  # torchvision's _blend, factor * x + (1 - factor) * other, clamped; in place on x
    return x.sub_(other).mul_(factor.view(-1, 1, 1, 1)).add_(other).clamp_(0, 1)


def adjust_hue(x, shift):
    """Rotate the hue of (n, 3, H, W) RGB in [0, 1] by `shift` (n,) turns, through HSV as torchvision does.
    Hue is kept in sextants (0..6) to save the divisions by 6. Written with arithmetic only: torch.where, boolean
    masks and remainder are several times slower than min / max / floor on the CPU."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # chroma; grey pixels (c = 0) get hue 0 as in torchvision
    # Which channel holds the maximum (r first, then g, as torchvision), as 0/1 floats: ceil(v - r) = 0 iff v == r.
    is_r = torch.ceil(v - r).neg_().add_(1.0)
    is_g = torch.ceil(v - g).neg_().add_(1.0).mul_(1.0 - is_r)
    # Hue in sextants: (g - b) / c if r is the maximum, 2 + (b - r) / c if g, 4 + (r - g) / c if b; shift; mod 6.
    # (In-place steps: each pass over the planes costs as much as the arithmetic here.)
    h = (g - b).mul_(is_r).add_((b - r).mul_(is_g)).add_((r - g).mul_(1.0 - is_r - is_g)).div_(c.clamp(min=1e-30))
    # + 2 is_g + 4 is_b + 6 shift, with is_b = 1 - is_r - is_g
    h.add_(is_g.mul_(-2.0).add_(is_r, alpha=-4.0).add_(4.0 + 6.0 * shift.view(-1, 1, 1)))
    h.sub_(torch.floor(h * (1 / 6)).mul_(6.0))
    # HSV -> RGB with v * s = c: the channel whose hue centre (r 0, g 2, b 4) lies at circular distance d from h
    # is v - c * clamp(d - 1, 0, 1): v within one sextant of its centre, v - c beyond two.
    t = (h.unsqueeze(1) - torch.arange(0.0, 6.0, 2.0, device=x.device).view(1, 3, 1, 1)).abs_()
    d = torch.minimum(t, 6.0 - t).clamp_(1.0, 2.0)
    return d.mul_(-c.unsqueeze(1)).add_((v + c).unsqueeze(1))


# The 24 orders of (brightness 0, contrast 1, saturation 2, hue 3), sorted by the position of hue first: images
# sorted by their order then get hue on one contiguous slice per position.
ORDERS = sorted(itertools.permutations(range(4)), key=lambda o: (o.index(3), o))


def jitter_params(n, strengths, p, device="cpu"):
    """Per image: which of the 24 ORDERS ColorJitter applies its ops in (uniform = torchvision's randperm(4); 24
    for images it leaves alone, prob. 1 - p) and the four factors."""
    b, c, s, h = strengths
    ranges = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]
    applied = torch.rand(n, device=device) < p
    order = torch.randint(len(ORDERS), (n,), device=device).masked_fill_(~applied, len(ORDERS))
    factors = torch.stack([_uniform(n, lo, hi, device) for lo, hi in ranges], dim=1)  # (n, 4)
    return order, factors


def color_jitter(x, strengths, order, factors, hue=adjust_hue):
    """torchvision ColorJitter(b, c, s, h) inside RandomApply(p), per image, in its own order (jitter_params).
    `x` must be sorted by `order` (augment_batch sorts the uint8 images before the crop): then at each position the
    images that get the same op form a few contiguous slices and every op runs in place on a slice.
    `hue` is adjust_hue or a compiled version of it."""
    counts = torch.bincount(order, minlength=len(ORDERS) + 1).tolist()
    bounds = [0, *itertools.accumulate(counts)]  # the images of ORDERS[k] are rows bounds[k]:bounds[k + 1]
    for position in range(4):
        runs = []  # (op, start, end): consecutive orders with the same op at this position merge into one slice
        for k, o in enumerate(ORDERS):
            if counts[k] == 0 or strengths[o[position]] == 0:
                continue
            if runs and runs[-1][0] == o[position] and runs[-1][2] == bounds[k]:
                runs[-1][2] = bounds[k + 1]
            else:
                runs.append([o[position], bounds[k], bounds[k + 1]])
        for op, start, end in runs:
            sub, f = x[start:end], factors[start:end, op]
            if op == 0:  # brightness: blend with black
                sub.mul_(f.view(-1, 1, 1, 1)).clamp_(0, 1)
            elif op == 1:  # contrast: blend with the mean of the grayscale image (= grayscale of the channel means)
                _blend_(sub, _grayscale(sub.mean(dim=(2, 3), keepdim=True)), f)
            elif op == 2:  # saturation: blend with the grayscale image
                _blend_(sub, _grayscale(sub), f)
            else:
                sub.copy_(hue(sub, f))
    return x


def gaussian_blur(x, p, kernel_size, sigma_range):
    """RandomApply(GaussianBlur(kernel_size, sigma)) with sigma ~ U(sigma_range) per image, reflect padding."""
    idx = (torch.rand(x.shape[0], device=x.device) < p).nonzero()[:, 0]
    sigma = _uniform(x.shape[0], sigma_range[0], sigma_range[1], x.device)[idx]
    if idx.numel() == 0:
        return x
    sub = x[idx]
    m, c, hgt, wid = sub.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c, K): one kernel per channel
    pad = kernel_size // 2
    y = F.pad(sub.reshape(1, m * c, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(m * c, 1, 1, kernel_size), groups=m * c)  # horizontal pass
    y = F.conv2d(y, kernel.view(m * c, 1, kernel_size, 1), groups=m * c)  # vertical pass
    x[idx] = y.view(m, c, hgt, wid)
    return x


def _per_image(x, p, fn):
    """Apply fn to the images selected with probability p (in place on x)."""
    idx = (torch.rand(x.shape[0], device=x.device) < p).nonzero()[:, 0]
    if idx.numel():
        x[idx] = fn(x[idx])
    return x


def augment_batch(images, recipe, hue=None):
    """uint8 (B, H, W, 3) on any device -> float (B, 3, S, S) views drawn from `recipe` (a common.augment.Recipe).
    `hue`: an alternative implementation of adjust_hue (the compiled one), same results."""
    n, height, width, _ = images.shape
    if recipe.jitter_p > 0:  # draw the jitter first and sort the images by their jitter order (color_jitter)
        order, factors = jitter_params(n, recipe.jitter, recipe.jitter_p, images.device)
        order, rows = order.sort(stable=True)
        images, factors = images.index_select(0, rows), factors.index_select(0, rows)
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
    boxes = crop_boxes(n, height, width, recipe.crop_scale, device=x.device)
    flip = torch.rand(n, device=x.device) < recipe.flip
    x = resized_crops(x, boxes, recipe.size, flip).div_(255)
    if recipe.jitter_p > 0:
        x = color_jitter(x, recipe.jitter, order, factors, hue or adjust_hue)
        x = x.index_select(0, rows.argsort())  # back to the images' order
    x = _per_image(x, recipe.gray_p, lambda v: _grayscale(v).expand(-1, 3, -1, -1))
    if recipe.blur_p > 0:
        x = gaussian_blur(x, recipe.blur_p, recipe.blur_kernel, recipe.blur_sigma)
    if recipe.solarize_p > 0:
        x = _per_image(x, recipe.solarize_p, lambda v: torch.where(v >= 128 / 255, 1.0 - v, v))
    mean = torch.tensor(recipe.mean, device=x.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(recipe.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).mul_(inv_std)
