"""The batched augmentation samples the torchvision recipes' distributions (parameters and outputs), not timing."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from common import augment
from common import batch_augment as B
from helpers import HostSyncCounter

# One thread: on a shared 2-core machine every op's 2-thread parallel region waits for a busy core
# (a 512-image view took 5.8 s with two threads, 0.03 s with one).
pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_images(n, size=32, seed=0):
    """uint8 (n, size, size, 3) images with structure at several scales, so crops and colours both matter."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def test_crop_boxes_follow_torchvision_sampling():
    torch.manual_seed(0)
    n, H, W, scale = 20000, 32, 48, (0.08, 1.0)
    boxes = B.crop_boxes(n, H, W, scale)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    assert torch.equal(w, w.round()) and torch.equal(h, h.round()) and (w >= 1).all() and (h >= 1).all()
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(1, H, W), scale, (3 / 4, 4 / 3)) for _ in range(n)],
                       dtype=torch.float32)  # (i, j, h, w)
    pairs = {"area": (w * h / (H * W), ref[:, 2] * ref[:, 3] / (H * W)), "ratio": (w / h, ref[:, 3] / ref[:, 2]),
             "x": (boxes[:, 0] / W, ref[:, 1] / W), "y": (boxes[:, 1] / H, ref[:, 0] / H)}
    for name, (ours, theirs) in pairs.items():  # n = 20000: standard errors are about 0.002
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01, name
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    assert torch.allclose(pairs["area"][0].quantile(q), pairs["area"][1].quantile(q), atol=0.02)


def test_crop_fallback_matches_torchvision():
    # A 4 x 64 image: no (area, ratio) attempt can fit, so both fall back to the central crop with ratio 4/3.
    boxes = B.crop_boxes(5, 4, 64, (0.9, 1.0))
    i, j, h, w = T.RandomResizedCrop.get_params(torch.zeros(1, 4, 64), (0.9, 1.0), (3 / 4, 4 / 3))
    assert boxes.tolist() == [[j, i, j + w, i + h]] * 5


def test_resized_crops_equal_bilinear_resize():
    img = torch.rand(1, 3, 32, 32, dtype=torch.float32)
    up = B.resized_crops(img, torch.tensor([[4.0, 8.0, 20.0, 24.0]]), 32)  # 16x16 crop enlarged: grid_sample
    ref = TF.resized_crop(img, 8, 4, 16, 16, [32, 32], antialias=False)
    torch.testing.assert_close(up, ref, atol=1e-5, rtol=0)
    smooth = smooth_images(1).permute(0, 3, 1, 2).float() / 255  # shrink: roi_align averages, close to antialiasing
    down = B.resized_crops(smooth, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 16)
    assert (down - TF.resize(smooth, [16, 16], antialias=True)).abs().mean() < 0.01


def test_hue_matches_torchvision():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    x[0] = 0.5  # grey pixels keep hue 0
    x[1, 1] = x[1, 0]  # ties for the maximum: r = g, r = b, g = b
    x[2, 2] = x[2, 0]
    x[3, 2] = x[3, 1]
    x[4] = (x[4] * 255).round() / 255
    shift = torch.rand(16) - 0.5
    shift[5:8] = torch.tensor([-0.5, 0.5, 0.0])
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(16)])
    torch.testing.assert_close(B.adjust_hue(x, shift), ref, atol=2e-6, rtol=0)


def jitter(x, strengths, p):
    """color_jitter as augment_batch runs it: draw the orders and factors, jitter a copy of x."""
    weights = B.jitter_weights(*B.jitter_params(len(x), strengths, p))
    return B.color_jitter(x.clone(), strengths, weights)


def test_jitter_applies_each_images_order_and_factors():
    """All four ops: every image equals torchvision's ops applied in the order and with the factors
    drawn for it (redrawn here from the same seed): the six masked blend passes around the one hue
    pass (PASSES) apply each image's ops in its order, and leave the images without jitter
    unchanged."""
    strengths, n = (0.4, 0.4, 0.4, 0.1), 64
    x = torch.rand(n, 3, 6, 6)
    torch.manual_seed(3)
    out = jitter(x, strengths, p=0.8)
    torch.manual_seed(3)
    order, factors = B.jitter_params(n, strengths, p=0.8)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    assert 0.6 < (order < len(B.ORDERS)).float().mean() < 0.95
    for i in range(n):
        ref = x[i]
        for op in (B.ORDERS[order[i]] if order[i] < len(B.ORDERS) else ()):
            ref = ops[op](ref, float(factors[i, op]))
        # 1e-4: torchvision's tensor grayscale weighs red 0.2989, ours 0.299 as PIL (which the CPU path runs).
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)
    alone = order == len(B.ORDERS)  # RandomApply left these out: every pass is an identity
    assert alone.any() and torch.equal(out[alone], x[alone])


def test_passes_put_every_order_in_place():
    """Each order's ops before hue, hue, then its ops after hue, read from the six blend passes
    (PASSES) around the hue pass, are that order; images without jitter have no op in any pass."""
    for o, passes in zip(B.ORDERS, B.PASSES):
        before, after = [op for op in passes[:3] if op != 3], [op for op in passes[3:] if op != 3]
        assert before + [3] + after == list(o)
    assert len(B.PASSES) == 25 and B.PASSES[-1] == (3,) * 6


def test_single_jitter_ops_match_torchvision():
    """With one non-zero strength, the op equals torchvision's on the tensor, with a factor in the right range and
    the op applied to about p of the images."""
    torch.manual_seed(0)
    x = torch.rand(4000, 3, 4, 4)
    for op, fn in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        strengths = [0.0] * 4
        strengths[op] = 0.4
        out = jitter(x, strengths, p=0.8)
        changed = (out != x).flatten(1).any(1)
        assert abs(changed.float().mean().item() - 0.8) < 0.03
        # Recover each image's factor by matching torchvision's op on a grid of factors.
        grid = torch.linspace(0.6, 1.4, 161)
        k = changed.nonzero()[:12, 0]
        for i in k.tolist():
            errs = torch.stack([(fn(x[i], float(f)) - out[i]).abs().max() for f in grid])
            assert errs.min() < 0.01  # some factor in [0.6, 1.4] reproduces it


def test_augment_batch_keeps_each_image_in_its_row():
    """Each image stays in its row through jitter's masked passes and the CPU's chunks: grey images,
    each with a white dot at its own place, keep the dot there through jitter (monotone on greys)
    with the crop the whole image."""
    n = 64
    images = torch.full((n, 32, 32, 3), 100, dtype=torch.uint8)
    for i in range(n):
        images[i, 4 * (i // 8) + 2, 4 * (i % 8) + 2] = 255
    r = augment.Recipe(32, (1.0, 1.0), flip=0.0, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.0,
                       mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    out = B.augment_batch(images, r)
    assert torch.equal(out[:, 0].flatten(1).argmax(1), images[..., 0].flatten(1).argmax(1))


def test_blur_and_solarize_match_torchvision():
    x = torch.rand(3, 3, 32, 32)
    out = B.gaussian_blur(x.clone(), torch.ones(3, 1, 1, 1), torch.full((3,), 1.3), kernel_size=5)
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [1.3, 1.3]) for i in range(3)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    r = augment.Recipe(32, (1.0, 1.0), flip=0.0, jitter_p=0.0, gray_p=0.0, solarize_p=1.0, mean=(0, 0, 0),
                       std=(1, 1, 1))
    img = smooth_images(2)
    ref = torch.stack([TF.to_tensor(TF.solarize(Image.fromarray(im.numpy()), 128)) for im in img])
    torch.testing.assert_close(B.augment_batch(img, r), ref, atol=1e-6, rtol=0)


@pytest.mark.sweep
@pytest.mark.parametrize("recipe", [augment.simclr_recipe(32, 0.5, blur=False), augment.byol_recipes(32)[1],
                                    augment.mocov2_recipe(32, crop_min=0.08, blur=True)],
                         ids=["simclr_cifar", "byol_view2", "mocov2_blur"])
def test_output_statistics_match_the_torchvision_pipeline(recipe):
    """Same images through both paths, 4 draws each: per-channel mean, std and the fraction of grey images agree.
    PIL rounds to 8 bits after every step (truncating in its blends), so its means sit about 1/255 (0.02 in
    normalised units) lower; the tolerances allow that plus sampling noise (about 0.02 for 2048 draws). Seen
    failing at 2048 draws (as at 4096): the brightness range halved, the grayscale probability halved."""
    torch.manual_seed(0)
    images = smooth_images(512)
    pil = augment.to_torchvision(recipe)
    ours = torch.cat([B.augment_batch(images, recipe) for _ in range(4)])  # (2048, 3, 32, 32)
    theirs = torch.stack([pil(Image.fromarray(im.numpy())) for _ in range(4) for im in images])
    for stat in (lambda v: v.mean(dim=(2, 3)), lambda v: v.std(dim=(2, 3))):
        a, b = stat(ours), stat(theirs)  # per image and channel
        assert torch.allclose(a.mean(0), b.mean(0), atol=0.05), (a.mean(0), b.mean(0))
        assert torch.allclose(a.std(0), b.std(0), atol=0.04), (a.std(0), b.std(0))
    mean, std = torch.tensor(recipe.mean).view(3, 1, 1), torch.tensor(recipe.std).view(3, 1, 1)
    def grey_fraction(v):
        rgb = v * std + mean
        return ((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 0.02).float().mean().item()
    assert abs(grey_fraction(ours) - grey_fraction(theirs)) < 0.04


def test_view_maker_paths(process_group):
    images = smooth_images(8)
    recipes = augment.byol_recipes(32)
    batched = augment.ViewMaker(recipes, 2, torch.device("cpu"), "gpu", "cifar10")
    assert batched.transform is None
    v1, v2 = batched(images)
    assert v1.shape == v2.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    cpu = augment.ViewMaker(recipes, 2, torch.device("cpu"), "auto", "cifar10")
    assert not cpu.batched and len(cpu.transform(Image.fromarray(images[0].numpy()))) == 2
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="needs an in-memory dataset"):
        augment.ViewMaker(recipes, 2, torch.device("cpu"), "gpu", "imagefolder")


# ----- the flip is horizontal, in both resize paths (a 180-degree rotation once passed every test above) -----

@pytest.mark.parametrize("size", [32, 48, 16], ids=["grid_sample-same", "grid_sample-enlarge", "roi_align-shrink"])
def test_flip_mirrors_columns_only(size):
    """A crop with the flip on equals the same crop without it, mirrored left-right (`flip(-1)`), whichever resize
    path runs; on an image with distinct rows and columns a vertical flip or a rotation cannot pass."""
    x = torch.rand(3, 3, 32, 32)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 27.0, 21.0], [8.0, 0.0, 20.0, 30.0]])
    plain = B.resized_crops(x, boxes, size)
    flipped = B.resized_crops(x, boxes, size, flip=torch.tensor([True, True, False]))
    torch.testing.assert_close(flipped[:2], plain[:2].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[2], plain[2], atol=0, rtol=0)
    if size == 32:  # the whole image at its own size: the flip is exactly x.flip(-1)
        torch.testing.assert_close(flipped[0], x[0].flip(-1), atol=1e-5, rtol=0)


def ks_two_sample(a, b):
    """Two-sample Kolmogorov-Smirnov test: (D, asymptotic p-value), as scipy.stats.ks_2samp(method='asymp')."""
    a, b = torch.sort(a.double())[0], torch.sort(b.double())[0]
    grid = torch.cat([a, b])
    d = ((torch.searchsorted(a, grid, right=True) / len(a)) - (torch.searchsorted(b, grid, right=True) / len(b)))
    d = float(d.abs().max())
    en = (len(a) * len(b) / (len(a) + len(b))) ** 0.5
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (k - 1) * torch.exp(torch.tensor(-2.0 * k * k * lam * lam)) for k in range(1, 101))
    return d, float(p.clamp(0, 1))


def top_minus_bottom(views):
    """Per view: mean of the top half minus mean of the bottom half (all channels); (n,)."""
    h = views.shape[-2] // 2
    return views[..., :h, :].mean(dim=(1, 2, 3)) - views[..., h:, :].mean(dim=(1, 2, 3))


@pytest.mark.sweep
@pytest.mark.parametrize("recipe", [augment.simclr_recipe(32, 0.5, blur=False), augment.byol_recipes(32)[0],
                                    augment.byol_recipes(32)[1], augment.mocov2_recipe(32, crop_min=0.08),
                                    augment.simclr_recipe(16, 0.5, blur=False)],
                         ids=["simclr_cifar", "byol_view1", "byol_view2", "mocov2", "simclr_shrink"])
def test_vertical_structure_matches_torchvision(recipe):
    """Images bright at the top and dark at the bottom: the distribution of each view's top-minus-bottom difference
    is the same through the batched path and torchvision (KS test over 1,024 views each). A flip that also
    mirrors the rows turns about half of the batched views upside down and fails by a wide margin (seen: every
    recipe fails with the rows mirrored in both resize paths)."""
    torch.manual_seed(0)
    n = 1024
    images = smooth_images(n)
    ramp = torch.linspace(90, -90, 32).view(1, 32, 1, 1)  # top rows +90, bottom rows -90
    images = (images.float() * 0.3 + 128 + ramp).clamp(0, 255).round().to(torch.uint8)
    ours = top_minus_bottom(B.augment_batch(images, recipe))
    pil = augment.to_torchvision(recipe)
    theirs = top_minus_bottom(torch.stack([pil(Image.fromarray(im.numpy())) for im in images]))
    d, p = ks_two_sample(ours, theirs)
    assert p > 0.01, (d, p, ours.mean(), theirs.mean())
    assert (theirs > 0).float().mean() > 0.75  # most views stay upright (solarize and crops flip a few)


# ----- no host synchronisation (#25): each random choice is a per-image weight, not a subset -----

SYNC_FREE_RECIPES = [augment.simclr_recipe(32, 0.5, blur=False), augment.byol_recipes(32)[0],
                     augment.byol_recipes(32)[1], augment.simclr_recipe(16, 0.5, blur=True)]


@pytest.mark.parametrize("one_chunk", [False, True], ids=["cpu_chunks", "whole_batch"])
def test_augment_batch_never_synchronises(monkeypatch, one_chunk):
    """The GPU's path (CPU_SUBSETS off; test_the_cpu_path_gives_the_gpu_paths_views_bit_for_bit ties
    the CPU's to it): zero host synchronisations (.item(), .tolist(), nonzero, boolean masks,
    host-to-device copies) in a call once the constants are on the device, in chunks and in the one
    whole-batch pass a GPU makes; there the op count (kernel launches on a GPU) stays far below the
    1157-1196 per view of the version with subsets. Recipes: jitter, grayscale, blur, solarize, and
    the shrinking crop."""
    monkeypatch.setattr(B, "CPU_SUBSETS", False)
    if one_chunk:
        monkeypatch.setattr(B, "CPU_CHUNK_PIXELS", 2 ** 40)
    images = smooth_images(64)
    for recipe in SYNC_FREE_RECIPES:
        B.augment_batch(images, recipe)  # the first call on a device copies its constants there
        with HostSyncCounter() as sync:
            B.augment_batch(images, recipe)
        assert sync.count == 0, sync.report()
        if one_chunk:
            assert sync.total_ops < 400, sync.ops.most_common(10)


EXACT_RECIPES = [augment.simclr_recipe(32, 0.5, blur=False), augment.simclr_recipe(40, 1.0, blur=True),
                 *augment.byol_recipes(32), augment.mocov2_recipe(28, blur=False),
                 augment.Recipe(32, jitter=(0.4, 0.4, 0.4, 0.0)), augment.Recipe(32, jitter=(0.0, 0.0, 0.0, 0.1)),
                 augment.Recipe(32, jitter_p=1.0, gray_p=0.0)]


@pytest.mark.parametrize("recipe", EXACT_RECIPES,
                         ids=lambda r: f"{r.size}px-{r.jitter}-p{r.jitter_p}-blur{r.blur_p}")
def test_the_cpu_path_gives_the_gpu_paths_views_bit_for_bit(monkeypatch, recipe):
    """On the CPU each step runs only on its images (sorted by the jitter's ops before the hue); the
    views equal the every-op-on-every-image path's bit for bit, on smooth images and on black and
    white ones (their crops reach 1 + 1.2e-7, which the GPU path's empty blend passes clamp: seen
    failing without the CPU path's clamp before pass 0), in chunks and as one batch. Recipes: jitter
    with and without hue, hue alone, grey, blur, solarize."""
    black_and_white = (smooth_images(150, 36, seed=1) > 127).to(torch.uint8) * 255
    for seed, images in enumerate([smooth_images(150, 36), black_and_white]):
        views = {}
        for subsets in (True, False):
            for chunk in (B.CPU_CHUNK_PIXELS, 2 ** 40):
                monkeypatch.setattr(B, "CPU_SUBSETS", subsets)
                monkeypatch.setattr(B, "CPU_CHUNK_PIXELS", chunk)
                torch.manual_seed(seed)
                views[subsets, chunk] = B.augment_batch(images, recipe)
        reference = views.pop((False, 2 ** 40))
        for key, v in views.items():
            assert torch.equal(v, reference), (seed, key, (v - reference).abs().max())


def test_chunks_and_unused_steps_change_nothing(monkeypatch):
    """The CPU's chunks give the views of one whole-batch pass bit for bit (all draws come first,
    every op is per image), and a step drawn for no image leaves the pixels bit-identical."""
    images, recipe = smooth_images(100), augment.byol_recipes(32)[1]
    torch.manual_seed(0)
    chunked = B.augment_batch(images, recipe)
    monkeypatch.setattr(B, "CPU_CHUNK_PIXELS", 2 ** 40)
    torch.manual_seed(0)
    assert torch.equal(B.augment_batch(images, recipe), chunked)
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(B.gaussian_blur(x, torch.zeros(4, 1, 1, 1), torch.ones(4), 5), x)
    strengths = (0.4, 0.4, 0.4, 0.1)
    weights = B.jitter_weights(*B.jitter_params(4, strengths, p=0.0))
    assert torch.equal(B.color_jitter(x.clone(), strengths, weights), x)


@pytest.mark.parametrize("field, p", [("gray_p", 0.2), ("blur_p", 0.5), ("solarize_p", 0.2)])
def test_each_step_changes_p_of_the_images(field, p):
    """Grayscale, blur and solarize each change about p of the images (per-image draws, 4000 images:
    the standard error is below 0.008) and leave the others bit-identical."""
    plain = dict(flip=0.0, jitter_p=0.0, gray_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    images = smooth_images(4000, size=16)
    base = B.augment_batch(images, augment.Recipe(16, (1.0, 1.0), **plain))  # the images themselves
    out = B.augment_batch(images, augment.Recipe(16, (1.0, 1.0), **{**plain, field: p}))
    changed = (out != base).flatten(1).any(1).float().mean().item()
    assert abs(changed - p) < 0.03, changed
