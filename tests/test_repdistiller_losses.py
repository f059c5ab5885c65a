"""distill_losses.py: RepDistiller's AB, FT, FSP and KDSVD against naive loop references written here (value and
gradient, float64) on real features of a same-family and a cross-family pair (the zoo's models at initialisation,
train-mode BN, random images), their modules' shape rules, the pairs FSP and KDSVD refuse, and analytic cases."""
import functools

import pytest
import torch

from common.cifar_models import Features, build_cifar_model
from common.config import ConfigError

import distill_losses as L
from tests.test_distill_losses import assert_same_value_and_grad, channel_mean_square, unit

B = 3  # images per batch of the real features

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def real_features(name):
    """The Features of zoo model `name` (seeded init, float64, train mode) on B seeded random images, no grad."""
    torch.manual_seed(0)
    model = build_cifar_model(name).double().train()
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        return model(x, features=True)


def leaves(maps):
    """Copies of the maps as leaf tensors with grad: the student side, whose gradient the tests compare."""
    return [f.detach().clone().requires_grad_(True) for f in maps]


def pair(name):
    t_name, s_name = name.split("-")
    return real_features(s_name), real_features(t_name)


def shapes(maps):
    return [f.shape for f in maps]


def with_stages(maps):
    """Features holding only `stages` (what Translator and KDSVD read here)."""
    return Features(maps, None, None, None, None)


def block_mean(f, size):
    """(B, C, H, W) -> (B, C, size, size): means of the non-overlapping r x r blocks, r = H / size (what adaptive
    average pooling does for an exact factor)."""
    r = f.shape[2] // size
    assert r * size == f.shape[2]
    return f.reshape(f.shape[0], f.shape[1], size, r, size, r).mean(dim=(3, 5))


def to_common_size(a, b):
    size = min(a.shape[2], b.shape[2])
    return block_mean(a, size), block_mean(b, size)


# ------------------------------------------------ AB ------------------------------------------------

def naive_ab(g_s, g_t, margin=1.0):
    """The authors' form, element by element masks: (s + m)^2 where s > -m and t <= 0, (s - m)^2 where s <= m and
    t > 0; per map summed, weight 1 for the deepest of n maps and halved towards the stem, / B * 3 / 1000."""
    n, total = len(g_s), 0
    for i in range(n):
        weight = 1.0
        for _ in range(n - 1 - i):
            weight /= 2
        layer = 0
        for b in range(B):
            s, t = g_s[i][b].flatten(), g_t[i][b].flatten()
            off = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).double()
            on = (s - margin) ** 2 * ((s <= margin) & (t > 0)).double()
            layer = layer + (off + on).sum()
        total = total + weight * layer * 3 / (1000 * B)
    return total


@pytest.mark.parametrize("names, kinds", [
    ("resnet32x4-resnet8x4", ["identity"] * 3),
    ("resnet32x4-ShuffleV1", [(torch.nn.ConvTranspose2d, 4, 2)] * 3),  # student 16/8/4 px -> teacher 32/16/8
    ("vgg13-MobileNetV2", [(torch.nn.Conv2d, 1, 1)] * 3 + [(torch.nn.ConvTranspose2d, 4, 2)]),  # 2 px -> 4 px last
])
def test_connector_follows_convreg_rules_on_real_pairs(names, kinds):
    """RepDistiller Connector: the identity where channels and size agree, else ConvReg's conv + BN (no ReLU),
    mapping every pre-activation stage output of the student to the teacher's shape."""
    s, t = pair(names)
    connector = L.Connector(shapes(s.preact[1:]), shapes(t.preact[1:])).double()
    assert len(connector.connectors) == len(kinds)
    out = connector(s.preact[1:])
    for layer, kind, f_s, f_t, o in zip(connector.connectors, kinds, s.preact[1:], t.preact[1:], out):
        assert o.shape == f_t.shape
        if kind == "identity":
            assert isinstance(layer, torch.nn.Identity) and o is f_s
            continue
        conv_type, kernel, stride = kind
        assert type(layer.conv) is conv_type and layer.conv.kernel_size == (kernel, kernel)
        assert layer.conv.stride == (stride, stride) and isinstance(layer.bn, torch.nn.BatchNorm2d)
        assert (o < 0).any()  # BN output, no ReLU
    assert (sum(p.numel() for p in connector.parameters()) == 0) == (kinds == ["identity"] * 3)


def test_connector_refuses_what_repdistiller_refuses():
    with pytest.raises(ConfigError, match="the student has 3 stage outputs and the teacher 4"):
        L.Connector([(2, 8, 8, 8)] * 3, [(2, 8, 8, 8)] * 4)
    with pytest.raises(ConfigError, match="no connector maps the student's 4x4 map to the teacher's 12x12"):
        L.Connector([(2, 8, 4, 4)], [(2, 8, 12, 12)])


@pytest.mark.parametrize("names", ["resnet32x4-resnet8x4", "resnet32x4-ShuffleV1"])
def test_ab_loss_matches_naive(names):
    """Through the connectors (trained ones for ShuffleV1), on the pre-activation maps (RepDistiller preact=True);
    the teacher's maps have both signs, so both hinges are exercised."""
    s, t = pair(names)
    g_s = leaves(s.preact[1:])
    torch.manual_seed(0)
    connector = L.Connector(shapes(g_s), shapes(t.preact[1:])).double()
    out = connector(g_s)
    assert all((f < 0).any() and (f > 0).any() for f in t.preact[1:])
    ours = L.ab_loss(out, t.preact[1:])
    inputs = g_s + [p for p in connector.parameters()][:2]
    assert_same_value_and_grad(ours, naive_ab(out, t.preact[1:]), inputs)


def test_ab_loss_analytic():
    """Zero where the student sits beyond the margin on the teacher's side; m^2 per element for a zero student."""
    torch.manual_seed(0)
    g_t = [torch.randn(B, 4, 8, 8, dtype=torch.float64), torch.randn(B, 6, 4, 4, dtype=torch.float64),
           torch.randn(B, 8, 2, 2, dtype=torch.float64)]
    beyond = [torch.where(t > 0, 1 + t.abs(), -1 - t.abs()) for t in g_t]
    assert L.ab_loss(beyond, g_t).item() == 0
    zero = [torch.zeros_like(t) for t in g_t]
    expected = sum(w * t[0].numel() for w, t in zip((0.25, 0.5, 1.0), g_t)) * 3 / 1000  # per image, m = 1
    assert abs(L.ab_loss(zero, g_t).item() - expected) < 1e-12
    assert abs(L.ab_loss(zero, g_t, margin=2.0).item() - 4 * expected) < 1e-12
    assert L.ab_loss(zero, g_t).dtype == torch.float64


# ------------------------------------------------ FT ------------------------------------------------

@pytest.mark.parametrize("names", ["resnet32x4-resnet8x4", "resnet32x4-ShuffleV1"])
def test_paraphraser_and_translator_shapes_on_real_pairs(names):
    """Paraphraser: factor (B, C_t / 2, H_t, W_t), reconstruction of the input's shape, no BN, RepDistiller's
    parameter names; Translator: the student's last stage to the paraphraser's channels at the student's size."""
    s, t = pair(names)
    f_s, f_t = s.stages[-1], t.stages[-1]
    torch.manual_seed(0)
    paraphraser = L.Paraphraser(f_t.shape).double()
    translator = L.Translator(f_s.shape, f_t.shape).double()
    half = f_t.shape[1] // 2
    factor, rec = paraphraser.factor(f_t), paraphraser.reconstruct(f_t)
    assert factor.shape == (B, half, *f_t.shape[2:]) and rec.shape == f_t.shape
    assert torch.equal(paraphraser.decoder(factor), rec)
    assert L.reconstruction_loss(rec, f_t).item() > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paraphraser.modules())
    assert [n for n, _ in paraphraser.named_parameters() if n.endswith("weight")] == [
        "encoder.0.weight", "encoder.3.weight", "encoder.6.weight",
        "decoder.0.weight", "decoder.3.weight", "decoder.6.weight"]
    for stack, conv in ((paraphraser.encoder, torch.nn.Conv2d), (paraphraser.decoder, torch.nn.ConvTranspose2d),
                        (translator.encoder, torch.nn.Conv2d)):
        assert [type(m) for m in stack[0::3]] == [conv] * 3
        assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1) for m in stack[0::3])
        assert all(type(m) is torch.nn.LeakyReLU and m.negative_slope == 0.1 for m in stack[2::3])
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in translator.modules()) == 3
    assert translator.encoder[3].weight.shape[:2] == (half, f_s.shape[1])
    factor_s, target = translator(s, t)
    assert factor_s.shape == (B, half, *f_s.shape[2:]) and target is t.stages[-1]


def naive_factor(f_s, f_t):
    """Pool to the common size, then per image: channel mean of squares, unit over positions, |difference| summed;
    divided by the number of entries."""
    f_s, f_t = to_common_size(f_s, f_t)
    total = 0
    for b in range(B):
        a_s, a_t = unit(channel_mean_square(f_s[b]).flatten()), unit(channel_mean_square(f_t[b]).flatten())
        total = total + (a_s - a_t).abs().sum()
    return total / (B * f_s[0, 0].numel())


@pytest.mark.parametrize("names", ["resnet32x4-resnet8x4", "resnet32x4-ShuffleV1"])
def test_factor_loss_matches_naive(names):
    """Through the translator (student) and the paraphraser's factor (teacher); ShuffleV1's 4x4 factor against the
    teacher's 8x8 one pooled."""
    s, t = pair(names)
    f_s = leaves([s.stages[-1]])[0]
    torch.manual_seed(0)
    translator = L.Translator(f_s.shape, t.stages[-1].shape).double()
    paraphraser = L.Paraphraser(t.stages[-1].shape).double()
    factor_s, _ = translator(with_stages([f_s]), t)
    with torch.no_grad():
        factor_t = paraphraser.factor(t.stages[-1])
    ours = L.factor_loss(factor_s, factor_t)
    assert_same_value_and_grad(ours, naive_factor(factor_s, factor_t), [f_s, translator.encoder[0].weight])


def test_factor_loss_analytic():
    """The attention map of the factor is blind to its scale and sign; a factor concentrated on one position vs a
    uniform one: sum |e_1 - 1/sqrt(HW)| / HW."""
    torch.manual_seed(0)
    x = torch.randn(B, 5, 4, 4, dtype=torch.float64)
    assert L.factor_loss(x, x).item() == 0
    assert abs(L.factor_loss(-3 * x, x).item()) < 1e-15
    peak, flat = torch.zeros(B, 5, 4, 4, dtype=torch.float64), torch.ones(B, 5, 4, 4, dtype=torch.float64)
    peak[:, :, 0, 0] = 2.0
    expected = ((1 - 0.25) + 15 * 0.25) / 16
    assert abs(L.factor_loss(peak, flat).item() - expected) < 1e-15


# ------------------------------------------------ FSP ------------------------------------------------

def naive_fsp(g_s, g_t):
    """Per consecutive pair, per image and per channel of the later map: its products with every channel of the
    earlier map, averaged over positions (the larger map block-averaged first); squared differences averaged."""
    def matrices(g, i, b):
        bottom, top = to_common_size(g[i], g[i + 1])
        return [(bottom[b].flatten(1) * top[b, j].flatten()).mean(dim=1) for j in range(top.shape[1])]

    total = 0
    for i in range(len(g_s) - 1):
        pair_sum, count = 0, 0
        for b in range(B):
            for row_s, row_t in zip(matrices(g_s, i, b), matrices(g_t, i, b)):
                pair_sum = pair_sum + ((row_s - row_t) ** 2).sum()
                count += len(row_s)
        total = total + pair_sum / count
    return total


@pytest.mark.parametrize("names", ["resnet32x4-resnet8x4", "resnet56-wrn_40_1"])
def test_fsp_loss_matches_naive(names):
    """Two pairs FSP accepts (equal channels: 32, 64, 128, 256 resp. 16, 16, 32, 64), the second across families;
    stage 2 and 3 are half their predecessor's size, so the pooling rule is exercised."""
    s, t = pair(names)
    L.check_fsp_shapes(shapes(s.stages), shapes(t.stages))
    g_s = leaves(s.stages)
    assert [f.shape[2] for f in g_s] == [32, 32, 16, 8]
    assert_same_value_and_grad(L.fsp_loss(g_s, t.stages), naive_fsp(g_s, t.stages), g_s)


@pytest.mark.parametrize("names, problem", [
    ("wrn_40_2-wrn_40_1", r"channel counts differ .*map 1: student 16, teacher 32; map 2: student 32, teacher 64"),
    ("resnet32x4-ShuffleV1", r"channel counts differ .*map 0: student 24, teacher 32"),
    ("vgg13-resnet8x4", r"the student has 4 maps .* and the teacher 5"),
])
def test_fsp_refuses_pairs_of_unequal_channels(names, problem):
    """RepDistiller's FSP raises for unequal channel counts (hence 0.00 for wrn_40_2 -> wrn_40_1 and no
    cross-architecture FSP numbers) and asserts equally many maps."""
    s, t = pair(names)
    with pytest.raises(ConfigError, match="fsp: .*" + problem):
        L.check_fsp_shapes(shapes(s.stages), shapes(t.stages))


def test_fsp_loss_analytic():
    """Maps of ones have FSP matrices of ones (whatever the sizes), zero maps zeros: 1 per consecutive pair."""
    sizes = [(4, 8), (4, 8), (6, 4), (3, 2)]
    ones = [torch.ones(B, c, h, h, dtype=torch.float64) for c, h in sizes]
    zeros = [torch.zeros_like(f) for f in ones]
    assert L.fsp_loss(ones, zeros).item() == 3 and L.fsp_loss(ones, ones).item() == 0
    torch.manual_seed(0)
    g = [torch.randn(B, c, h, h, dtype=torch.float64) for c, h in sizes]
    assert abs(L.fsp_loss([2 * f for f in g], g).item() - 9 * L.fsp_loss(g, zeros).item()) < 1e-12  # G scales by 4


# ------------------------------------------------ KDSVD ------------------------------------------------

def leading_singular(m, n):
    """(C, H, W) -> (n largest singular values, their right singular vectors over the channels) of the (HW, C)
    matrix, from the eigendecomposition of its smaller Gram matrix (no SVD routine)."""
    x = m.flatten(1).T  # (HW, C)
    if x.shape[1] <= x.shape[0]:
        eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)  # ascending
        top = range(x.shape[1] - 1, x.shape[1] - 1 - n, -1)
        return [eigenvalues[i].sqrt() for i in top], [eigenvectors[:, i] for i in top]
    eigenvalues, eigenvectors = torch.linalg.eigh(x @ x.T)
    top = range(x.shape[0] - 1, x.shape[0] - 1 - n, -1)
    return [eigenvalues[i].sqrt() for i in top], [x.T @ eigenvectors[:, i] / eigenvalues[i].sqrt() for i in top]


def lapack_sign(m, v, j):
    """The sign LAPACK's SVD gives the teacher's j-th right singular vector, relative to v (the reference's own):
    the one input the reference borrows, as KDSVD's value depends on it."""
    vh = torch.linalg.svd(m.flatten(1).T, full_matrices=False)[2]
    return 1.0 if float(vh[j] @ v) > 0 else -1.0


def naive_kdsvd(g_s, g_t, k=1):
    """Per image and map: the teacher's k leading right singular vectors (LAPACK's signs) and the student's k + 3,
    each teacher vector paired with the student vector of largest |cosine| (its sign applied), both scaled by the
    teacher's singular values over their norm; per consecutive maps and vector j the RBF matrix
    exp(-(v[c] - v_prev[c'])^2 / 8) by outer differences; squared differences summed, / B."""
    total = 0
    for b in range(B):
        previous = None
        for f_s, f_t in zip(g_s, g_t):
            sigma_t, v_t = leading_singular(f_t[b], k)
            v_t = [lapack_sign(f_t[b], v, j) * v for j, v in enumerate(v_t)]
            _, v_s = leading_singular(f_s[b], k + 3)
            norm = sum(x ** 2 for x in sigma_t).sqrt()
            pairs = []
            for j in range(k):
                cosines = [float((v @ v_t[j]).detach()) for v in v_s]
                best = max(range(k + 3), key=lambda i: abs(cosines[i]))
                sign = 1.0 if cosines[best] > 0 else -1.0
                pairs.append((sign * v_s[best] * sigma_t[j] / norm, v_t[j] * sigma_t[j] / norm))
            if previous is not None:
                for (s_j, t_j), (s_prev, t_prev) in zip(pairs, previous):
                    rbf_s = torch.exp(-(s_j[:, None] - s_prev[None, :]) ** 2 / 8)
                    rbf_t = torch.exp(-(t_j[:, None] - t_prev[None, :]) ** 2 / 8)
                    total = total + ((rbf_s - rbf_t) ** 2).sum() / B
            previous = pairs
    return total


@pytest.mark.parametrize("names, k", [("resnet32x4-resnet8x4", 1), ("resnet32x4-resnet8x4", 2),
                                      ("resnet56-wrn_40_1", 1)])
def test_kdsvd_loss_matches_naive(names, k):
    """Both cases of the SVD's shape occur: 32x32 and 16x16 maps have more positions than channels, the 8x8 ones
    of resnet32x4 fewer (64 < 256)."""
    s, t = pair(names)
    L.check_kdsvd_shapes(shapes(s.stages[1:]), shapes(t.stages[1:]))
    g_s = leaves(s.stages[1:])
    ours = L.kdsvd_loss(g_s, t.stages[1:], k=k)
    assert ours.item() > 0
    assert_same_value_and_grad(ours, naive_kdsvd(g_s, t.stages[1:], k), g_s)


def test_kdsvd_wiring_and_analytic():
    """A one-stage method without parameters: build_head is None for a pair of equal channels and refuses one of
    unequal channels; baseline_loss reads stages[1:]. The student's singular vectors are aligned to the teacher's
    whatever their sign or scale, so a student equal to the teacher up to a factor costs nothing."""
    s, t = pair("resnet32x4-resnet8x4")
    s_shapes, t_shapes = (with_stages(shapes(f.stages)) for f in (s, t))
    assert L.METHODS["kdsvd"] is L.KDSVD and L.KDSVD(s_shapes, t_shapes, None, 0).head is None
    for names in ("wrn_40_2-wrn_40_1", "resnet32x4-ShuffleV1"):
        a, b = pair(names)
        with pytest.raises(ConfigError, match="kdsvd: the student's and the teacher's channel counts differ"):
            L.KDSVD(with_stages(shapes(a.stages)), with_stages(shapes(b.stages)), None, 0)
    ours = L.KDSVD(s_shapes, t_shapes, None, 0).loss(s, t, None, None, None)
    assert ours.dtype == torch.float32
    expected = L.kdsvd_loss([f.float() for f in s.stages[1:]], [f.float() for f in t.stages[1:]])
    assert torch.equal(ours, expected)
    g = t.stages[1:]
    assert L.kdsvd_loss(g, g).item() < 1e-20
    assert L.kdsvd_loss([-2 * f for f in g], g).item() < 1e-20
    assert L.kdsvd_loss(s.stages[1:], g).item() > 1e-3


def test_kdsvd_gradient_stays_finite_with_dead_channels():
    """ReLU-dead channels (all-zero maps: they appear within a few steps on Fashion-MNIST) give the student's map
    repeated zero singular values. KDSVD reads only the leading singular vectors, whose derivative does not involve
    the gaps between those zeros, yet torch's SVD backward divides 0 by 0 there and returns NaN (a real run then
    crashes in the next step's SVD). The gradient must stay finite, the value unchanged, and equal the naive
    reference's wherever that one is finite (a live copy of the same maps)."""
    s, t = pair("resnet32x4-resnet8x4")
    maps = [f.detach().clone() for f in s.stages[1:]]
    for f in maps:
        f[:, -3:] = 0  # three dead channels in every map
    g_s = leaves(maps)
    ours = L.kdsvd_loss(g_s, t.stages[1:])
    grads = torch.autograd.grad(ours, g_s)
    assert torch.isfinite(ours) and all(torch.isfinite(g).all() for g in grads)
    naive = naive_kdsvd(g_s, t.stages[1:])
    torch.testing.assert_close(ours, naive, rtol=1e-9, atol=0)
    with torch.no_grad():  # live channels: a tiny perturbation of the dead ones, where the naive gradient is finite
        live = [f + 1e-9 * torch.randn_like(f) * (f == 0) for f in maps]
    live = leaves(live)
    naive_grads = torch.autograd.grad(naive_kdsvd(live, t.stages[1:]), live)
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
