"""The augmentation recipes of common/augment.py as batched tensor ops, for images held in
memory (CIFAR, STL-10).

One call turns a uint8 batch (B, H, W, 3) into normalised float views (B, 3, S, S) on the batch's
device, with independent random parameters per image drawn exactly as torchvision draws them:
- random resized crop: torchvision's 10 attempts at (scale, log-ratio), then its central fallback;
  the crop is resized with roi_align (bilinear; averaged over the source pixels of each output
  pixel when shrinking);
- horizontal flip; colour jitter applied with probability p, brightness / contrast / saturation /
  hue each with its own factor, in a random order per image (torchvision's randperm(4)), clamping
  after each step as torchvision does;
- grayscale; Gaussian blur with a per-image sigma, reflect padding, the recipe's kernel size;
  solarize; normalise.
On a GPU this removes the CPU data pipeline as the bottleneck of small-image SSL (solo-learn needs
DALI for that). There no shape depends on the random draws: every op runs on every image, with
per-image factors or 0 / 1 weights, so a call never waits for the GPU (no host synchronisation; the
tests count them). On the CPU, where nothing waits, the same ops run only on the images drawn for
them (CPU_SUBSETS), with the same results bit for bit. The random numbers come from torch's global
RNG of that device, so per-epoch reseeding keeps runs reproducible.
"""
import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision / PIL


def _uniform(n, low, high, device):
    return torch.rand(n, device=device) * (high - low) + low


def crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """(n, 4) boxes x1, y1, x2, y2 in pixels, sampled as torchvision's RandomResizedCrop.get_params,
    batched."""
    area = height * width
    target = area * _uniform(n * 10, scale[0], scale[1], device).view(n, 10)
    aspect = torch.exp(_uniform(n * 10, math.log(ratio[0]), math.log(ratio[1]), device)).view(n, 10)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # the first attempt that fits, as torchvision's loop
    first = torch.where(ok.any(1), ok.float().argmax(1), -1)
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
    """Crop each image of (n, 3, H, W) to its box and resize to size x size, bilinear. When every
    crop is enlarged (output size >= image size: CIFAR at 32, STL-10 at 96) grid_sample gives
    exactly crop-then-bilinear-resize; otherwise roi_align averages the source pixels of each
    output pixel, as an antialiased resize does (it may read up to half a pixel beyond the crop's
    edge). `flip` (n,) bool mirrors those crops horizontally."""
    n, _, height, width = x.shape
    if size >= max(height, width):
        # output pixel centres in [0, 1]
        v = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size
        x1, y1, x2, y2 = boxes[:, :, None].unbind(1)  # each (n, 1)
        # A mirrored crop samples its columns right to left (the flip costs nothing here); its rows
        # keep their order.
        # (n, size) or (size,): columns only
        u = v if flip is None else torch.where(flip[:, None], 1.0 - v, v)
        # Source positions in pixel-edge units, clamped to the crop's first and last pixel centres:
        # resizing a cropped image never reads outside the crop.
        px = torch.minimum(torch.maximum(x1 + u * (x2 - x1), x1 + 0.5), x2 - 0.5)  # (n, size)
        py = torch.minimum(torch.maximum(y1 + v * (y2 - y1), y1 + 0.5), y2 - 0.5)
        # grid_sample's [-1, 1] (align_corners=False)
        gx, gy = px * (2.0 / width) - 1, py * (2.0 / height) - 1
        grid = torch.stack([gx[:, None, :].expand(n, size, size),
                            gy[:, :, None].expand(n, size, size)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rois = torch.cat([torch.arange(n, device=x.device, dtype=x.dtype)[:, None], boxes],
                     dim=1)  # (n, 5)
    out = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out if flip is None else torch.where(flip[:, None, None, None], out.flip(-1), out)


def _grayscale(x):  # (n, 3, H, W) -> (n, 1, H, W)
    return (x[:, 0] * GRAY[0]).add_(x[:, 1], alpha=GRAY[1]).add_(x[:, 2], alpha=GRAY[2])[:, None]


def _select(w, a, b):
    """a where w (n, 1, 1, 1) is 0, b where it is 1: lerp with weights 0 and 1 returns a or b
    exactly and is about twice as fast on the CPU as torch.where with a per-image mask."""
    return torch.lerp(a, b.expand_as(a), w)


def adjust_hue(x, shift):
    """Rotate the hue of (n, 3, H, W) RGB in [0, 1] by `shift` (n,) turns, through HSV as
    torchvision does. Hue is kept in sextants (0..6) to save the divisions by 6. Written with
    arithmetic only: torch.where, boolean masks and remainder are several times slower than min /
    max / floor on the CPU."""
    r, g, b = x.unbind(1)
    # (Each plane-sized temporary is reused once its value is spent (out=, in place), which keeps a
    # CPU chunk's working set in the cache: about 5% faster for 32 px views.)
    v = torch.maximum(r, g)
    torch.maximum(v, b, out=v)
    c = torch.minimum(r, g)
    torch.minimum(c, b, out=c)
    torch.sub(v, c, out=c)  # chroma; grey (c = 0) gets hue 0, as torchvision
    # Which channel holds the maximum (r first, then g, as torchvision), as 0/1 floats: sign(v - r)
    # is 0 where r is the maximum, else 1; b holds it where neither r nor g does.
    not_r = torch.sub(v, r).sign_()
    is_b = torch.sub(v, g).sign_().mul_(not_r)
    is_g = torch.sub(not_r, is_b)
    # Hue in sextants: (g - b) / c if r is the maximum, 2 + (b - r) / c if g, 4 + (r - g) / c if b;
    # shift; mod 6.
    h = torch.sub(g, b).mul_(not_r.neg_().add_(1.0))  # (not_r is now is_r)
    tmp = torch.sub(b, r).mul_(is_g)
    h.add_(tmp).add_(torch.sub(r, g, out=tmp).mul_(is_b))
    offset = is_g.mul_(2.0).add_(is_b, alpha=4.0).add_(6.0 * shift.view(-1, 1, 1))  # 2 if g, 4 if b
    h.div_(torch.clamp(c, min=1e-30, out=tmp)).add_(offset)
    h.sub_(torch.mul(h, 1 / 6, out=tmp).floor_().mul_(6.0))
    # HSV -> RGB with v * s = c: the channel whose hue centre (r 0, g 2, b 4) lies at circular
    # distance d from h is v - c * clamp(d - 1, 0, 1): v within one sextant of its centre, v - c
    # beyond two sextants.
    t = (h.unsqueeze(1) - torch.arange(0.0, 6.0, 2.0, device=x.device).view(1, 3, 1, 1)).abs_()
    d = torch.minimum(t, torch.rsub(t, 6.0), out=t).clamp_(1.0, 2.0)
    v.add_(c)  # v + c
    return d.mul_(c.neg_().unsqueeze(1)).add_(v.unsqueeze(1))


# The 24 orders of (brightness 0, contrast 1, saturation 2, hue 3); jitter_params draws an index.
ORDERS = list(itertools.permutations(range(4)))


def _jitter_passes():
    """Per order (the 24, then 'not applied'): the blend op (0 brightness, 1 contrast, 2 saturation,
    3 none) of each of color_jitter's six blend passes. The ops before hue are right-aligned in
    passes 0-2 and the ops after it left-aligned in passes 3-5, so the one hue pass between them is
    in its place for every order."""
    rows = []
    for o in ORDERS:
        before, after = o[:o.index(3)], o[o.index(3) + 1:]
        rows.append((3,) * (3 - len(before)) + before + after + (3,) * (3 - len(after)))
    return tuple(rows) + ((3,) * 6,)


PASSES = _jitter_passes()  # (25, 6)
# Per order (the 24, then 'not applied'): how many blend ops come before the hue (-1: not jittered);
# the CPU path sorts the images by it.
BEFORE_HUE = tuple(o.index(3) for o in ORDERS) + (-1,)


@functools.lru_cache(maxsize=None)
def _constant(values, device, dtype=torch.float32):
    """`values` (nested tuples) as a tensor on `device`, made once: a copy of host data to a GPU
    blocks the host (a synchronisation), so augment_batch makes none of its constants per call."""
    return torch.tensor(values, device=device, dtype=dtype)


def jitter_params(n, strengths, p, device="cpu"):
    """Per image: which of the 24 ORDERS ColorJitter applies its ops in (uniform = torchvision's
    randperm(4); 24 for images it leaves alone, prob. 1 - p) and the four factors."""
    b, c, s, h = strengths
    ranges = [(max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h)]
    applied = torch.rand(n, device=device) < p
    order = torch.randint(len(ORDERS), (n,), device=device).masked_fill_(~applied, len(ORDERS))
    factors = torch.stack([_uniform(n, lo, hi, device) for lo, hi in ranges], dim=1)  # (n, 4)
    return order, factors


def jitter_weights(order, factors):
    """color_jitter's per-image weights from jitter_params' draws, as a dict.
    `blend` (n, 6, 3, 1, 1, 1): for each of the six blend passes (PASSES), the factor f, the weight
    1 - f of the grey image (saturation) and that of the grey mean (contrast), 0 otherwise
    (brightness blends with black); an image without an op in a pass gets f = 1 and weights 0, so
    x * 1 + 0: an exact identity. `hue_on` (n, 1, 1, 1) 0 / 1 and `shift` (n,): the hue pass."""
    ops = _constant(PASSES, order.device, torch.long)[order]  # (n, 6): 0 b, 1 c, 2 s, 3 none
    f = torch.cat([factors[:, :3], torch.ones_like(factors[:, :1])], dim=1).gather(1, ops)  # (n, 6)
    blend = torch.stack([f, (ops == 2) * (1.0 - f), (ops == 1) * (1.0 - f)], dim=2)  # (n, 6, 3)
    hue_on = (order < len(ORDERS)).to(factors.dtype).view(-1, 1, 1, 1)
    return dict(blend=blend.view(*blend.shape, 1, 1, 1), hue_on=hue_on, shift=factors[:, 3])


def color_jitter(x, strengths, weights, hue=adjust_hue, spans=None):
    """torchvision ColorJitter(b, c, s, h) inside RandomApply(p), per image, in its own order, on
    (n, 3, H, W) in [0, 1] (x may be overwritten), with `weights` from jitter_weights. Every op runs
    on every image, so no shape depends on the draws: three blend passes for the ops an image has
    before hue, one hue pass, three blend passes for the ops after it; a pass leaves an image
    without an op there bit-identical, apart from clamping it to [0, 1]. A blend is torchvision's
    _blend, f x + (1 - f) other clamped to [0, 1]. `hue`: adjust_hue or its compiled version.
    `spans` (the CPU path, _spans): per blend pass and then for the hue, the rows (start, end) of
    the images with an op there; the others are only clamped where that can change them, which
    gives the same result."""
    for k in range(6):
        if k == 3 and strengths[3]:
            if spans is None:
                x = _select(weights["hue_on"], x, hue(x, weights["shift"]))
            else:
                a, b = spans[6]
                x[a:b] = hue(x[a:b], weights["shift"][a:b])
        if any(strengths[:3]):
            a, b = (0, len(x)) if spans is None else spans[k]
            if spans is not None and k in (0, 3):
                # a pass only clamps the images without an op in it (a crop may reach 1 + 1e-7);
                # at passes 1, 2, 4 and 5 that repeats a clamp they have had (at pass 0, at pass
                # 3, or in a blend of their own)
                x[:a].clamp_(0, 1)
                x[b:].clamp_(0, 1)
            xs = x[a:b]
            f, w_sat, w_con = weights["blend"][a:b, k].unbind(1)  # each (n, 1, 1, 1)
            grey = _grayscale(xs)  # (n, 1, H, W)
            mean = grey.mean(dim=(2, 3), keepdim=True)
            other = grey.mul_(w_sat).add_(mean.mul_(w_con))  # (1 - f) x grey image, grey mean or 0
            torch.addcmul(other, xs, f, out=xs).clamp_(0, 1)
    return x


def _blur(x, sigma, kernel_size):
    """GaussianBlur(kernel_size, sigma) of each image of (n, C, H, W) with its own sigma (n,),
    reflect padding: one horizontal and one vertical pass of a per-channel convolution."""
    n, c, hgt, wid = x.shape
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, K)
    kernel = kernel[:, None].expand(n, c, kernel_size).reshape(n * c, kernel_size)  # per channel
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, hgt, wid), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)  # horizontal pass
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)  # vertical pass
    return y.view(n, c, hgt, wid)


def gaussian_blur(x, blurred, sigma, kernel_size, subsets=False):
    """RandomApply(GaussianBlur(kernel_size, sigma)) with reflect padding: the images where
    `blurred` (n, 1, 1, 1) is 1 are blurred with their own sigma (n,), the others are left
    bit-identical (a select, not an impulse kernel: a GPU may convolve in TF32 or with an FFT)."""
    return _where_drawn(blurred, x, lambda v, s: _blur(v, s, kernel_size), subsets, sigma)


def _solarize(x):  # v >= 128 / 255 -> 1 - v (exact there)
    return torch.where(x >= 128 / 255, 1.0 - x, x)


def _where_drawn(weight, x, op, subsets, *per_image):
    """x where the 0 / 1 `weight` (n, 1, 1, 1) is 0, op(x, *per_image) where it is 1 (x may be
    overwritten). The GPU path runs op on every image and selects, so no shape depends on the
    draws; `subsets` (the CPU path) runs it on those rows only."""
    if not subsets:
        return _select(weight, x, op(x, *per_image))
    rows = weight.view(-1).nonzero().squeeze(1)
    if len(rows):  # (a convolution refuses an empty batch)
        picked = x.index_select(0, rows)
        x.index_copy_(0, rows, op(picked, *(p[rows] for p in per_image)).expand_as(picked))
    return x


def _pixel_ops(x, recipe, hue, draws, subsets):
    """Jitter, grayscale, blur, solarize and normalise (n, 3, S, S) in [0, 1], in place, with
    augment_batch's per-image `draws` (a step the recipe does not have has none). `subsets` (the
    CPU path): the images are sorted by draws["before"], and each step runs only on its images."""
    if "blend" in draws:
        spans = _spans(draws["before"]) if subsets else None
        x = color_jitter(x, recipe.jitter, draws, hue, spans)
    if "gray" in draws:  # the grey plane in the 3 channels
        x = _where_drawn(draws["gray"], x, _grayscale, subsets)
    if "blurred" in draws:
        x = gaussian_blur(x, draws["blurred"], draws["sigma"], recipe.blur_kernel, subsets)
    if "solarized" in draws:
        x = _where_drawn(draws["solarized"], x, _solarize, subsets)
    mean, std = _constant(recipe.mean, x.device), _constant(recipe.std, x.device)
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def _spans(before):
    """The CPU path's rows (start, end) of each of color_jitter's passes in a chunk sorted by
    `before` (-1: not jittered, else the number of blend ops before the hue): blend passes 0-2 have
    the images with at least 3 - k ops before the hue, passes 3-5 those with at most 5 - k (ops
    after it are left-aligned), the hue every jittered image."""
    s = torch.searchsorted(before, torch.arange(5)).tolist()  # s[v]: the first row with before >= v
    n = len(before)
    return [(s[3], n), (s[2], n), (s[1], n), (s[0], s[3]), (s[0], s[2]), (s[0], s[1]), (s[0], n)]


# On the CPU, augment_batch runs the steps after the crop (jitter to normalisation) in chunks of
# images of about this many pixels per channel, in place: the ops' temporaries then stay in the
# CPU's caches. 2**17 was the fastest of 2**15-2**18 at 32 and 96 px (bench.py --augment). A GPU
# takes the whole batch at once.
CPU_CHUNK_PIXELS = 2 ** 17
# On the CPU nothing waits for the host, so there augment_batch spends no work on the images a step
# leaves alone: it sorts the images by BEFORE_HUE of their jitter order, so that each jitter pass
# has its images in one slice, and greys, blurs and solarizes only the images drawn for it. Same
# views bit for bit (tests); False runs the GPU's path on the CPU (the sync-counting tests do).
CPU_SUBSETS = True


def augment_batch(images, recipe, hue=None):
    """uint8 (B, H, W, 3) on any device -> float (B, 3, S, S) views drawn from `recipe` (a
    common.augment.Recipe). `hue`: an alternative implementation of adjust_hue (the compiled one),
    same results. Off the CPU no host synchronisation once the constants are on the device (the
    first call on a device copies them there): each random choice is a per-image factor or 0 / 1
    weight applied to every image, so on a GPU the call only queues work."""
    n, height, width, _ = images.shape
    dev = images.device
    draws = {}  # per-image tensors (first dimension n); all the random draws first, in this order
    subsets = dev.type == "cpu" and CPU_SUBSETS
    if recipe.jitter_p > 0:
        order, factors = jitter_params(n, recipe.jitter, recipe.jitter_p, dev)
        draws.update(jitter_weights(order, factors))
        if subsets:
            draws["before"] = _constant(BEFORE_HUE, dev, torch.long)[order]
    draws["box"] = crop_boxes(n, height, width, recipe.crop_scale, device=dev)
    draws["flip"] = torch.rand(n, device=dev) < recipe.flip
    if recipe.gray_p > 0:
        draws["gray"] = (torch.rand(n, device=dev) < recipe.gray_p).float().view(-1, 1, 1, 1)
    if recipe.blur_p > 0:
        draws["blurred"] = (torch.rand(n, device=dev) < recipe.blur_p).float().view(-1, 1, 1, 1)
        draws["sigma"] = _uniform(n, recipe.blur_sigma[0], recipe.blur_sigma[1], dev)
    if recipe.solarize_p > 0:
        solarized = torch.rand(n, device=dev) < recipe.solarize_p
        draws["solarized"] = solarized.float().view(-1, 1, 1, 1)
    perm = None  # the CPU path: the sorted order of the images
    if "before" in draws:
        perm = draws["before"].argsort(stable=True)
        images = images.index_select(0, perm)  # (a gather by index_select: 8x faster than [])
        draws = {k: v.index_select(0, perm) for k, v in draws.items()}
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) in [0, 255]
    x = resized_crops(x, draws["box"], recipe.size, draws["flip"]).div_(255)
    # The steps after the crop: on the CPU chunk by chunk, in place; a GPU takes the whole batch at
    # once. (The GPU's path returns new views, copied back into x; the tests run it on the CPU.)
    step = max(1, CPU_CHUNK_PIXELS // recipe.size ** 2) if dev.type == "cpu" else n
    for i in range(0, n, step):
        rows = slice(i, i + step)
        d = {k: v[rows] for k, v in draws.items()}
        x[rows] = _pixel_ops(x[rows], recipe, hue or adjust_hue, d, subsets)
    return x if perm is None else x.index_select(0, perm.argsort())  # back to the images' order
