"""distill_losses.py, RepDistiller's baselines and CRD (METHODS.md section 9): each loss against a naive loop
reference written here (value and gradient, float64), on random features of the slides' six pairs' shapes (FitNet,
AT, SP, CC, VID, RKD, PKT, NST) or on real features of a same-family and a cross-family pair (AB, FT, FSP, KDSVD);
CRD's loss, memory banks (also on the gloo pool's 2 ranks) and sampler; the modules' shape rules and the pairs
RepDistiller refuses; analytic cases; and one training step of every --distill method on every pair of RepDistiller's
table (its README's configs where it has the cell, which include the slides' six pairs)."""
import copy
import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from common import augment, config, data, dist
from common.cifar_models import Features, build_cifar_model, feature_shapes
from common.config import ConfigError
from helpers import REPDISTILLER_PAIRS, ROOT

import distill_losses as L
import ifacd_distill as M

PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "resnet110-resnet20"]
# The loss references run on every pair; the inner loop (-m "not sweep") on the first only.
PAIRS_SWEPT = [PAIRS[0]] + [pytest.param(pair, marks=pytest.mark.sweep) for pair in PAIRS[1:]]
B = 4  # batch of the random-feature loss checks: RKD's angles need 3 samples, CC's consecutive pairs 2


pytestmark = pytest.mark.usefixtures("one_thread")
RD_CONFIGS = os.path.join(ROOT, "configs", "ifacd_distill", "repdistiller")  # one YAML per README cell


@functools.lru_cache(maxsize=None)
def shapes_of(name):
    """The zoo model's Features as shapes (a probe forward of 2 images), computed once per model."""
    return feature_shapes(build_cifar_model(name))


def random_features(name, seed, requires_grad=False):
    """Random float64 Features of model `name`'s shapes at batch B (leaf tensors, with grad if asked)."""
    g = torch.Generator().manual_seed(seed)

    def r(shape):
        return torch.randn((B, *shape[1:]), generator=g, dtype=torch.float64).requires_grad_(requires_grad)

    shapes = shapes_of(name)
    return Features([r(x) for x in shapes.stages], r(shapes.pooled), r(shapes.logits),
                    [r(x) for x in shapes.last_stage], [r(x) for x in shapes.preact])


def pair_features(pair):
    """(student features with grad, teacher features without) of a pair, random, float64."""
    t_name, s_name = pair.split("-")
    return random_features(s_name, 0, requires_grad=True), random_features(t_name, 1)


def assert_same_value_and_grad(ours, naive, inputs):
    """ours == naive in float64, and so are their gradients with respect to every tensor of `inputs`."""
    assert ours.dtype == torch.float64 and ours.dim() == 0
    torch.testing.assert_close(ours, naive, rtol=1e-9, atol=0)
    g_ours = torch.autograd.grad(ours, inputs, retain_graph=True)
    g_naive = torch.autograd.grad(naive, inputs, retain_graph=True)
    for a, b in zip(g_ours, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12 * float(b.abs().max()))


def channel_mean_square(f):
    """(C, H, W) -> (H, W): the mean over channels of f^2, one channel at a time."""
    return sum(f[c] ** 2 for c in range(f.shape[0])) / f.shape[0]


def unit(v):
    return v / (v ** 2).sum().sqrt()


B_REAL = 3  # images per batch of the real features

@functools.lru_cache(maxsize=None)
def real_features(name):
    """The Features of zoo model `name` (seeded init, float64, train mode) on B_REAL seeded random images, no grad."""
    torch.manual_seed(0)
    model = build_cifar_model(name).double().train()
    x = torch.randn(B_REAL, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
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


# ------------------------------------------------ FitNet ------------------------------------------------

def test_hint_regressor_follows_convreg_shape_rules():
    """RepDistiller ConvReg: 3x3 stride-2 conv (H_s = 2 H_t), 4x4 stride-2 deconv (2 H_s = H_t), kernel 1 + H_s - H_t
    otherwise; a smaller student map that is not half the teacher's is refused."""
    for s_hw, t_hw, kind, kernel in ((16, 8, torch.nn.Conv2d, 3), (8, 16, torch.nn.ConvTranspose2d, 4),
                                     (10, 8, torch.nn.Conv2d, 3), (8, 8, torch.nn.Conv2d, 1)):
        reg = L.HintRegressor((2, 6, s_hw, s_hw), (2, 5, t_hw, t_hw), layer=0)
        assert type(reg.conv) is kind and reg.conv.kernel_size == (kernel, kernel)
        s = Features([torch.randn(2, 6, s_hw, s_hw)], None, None, None, None)
        t = Features([torch.randn(2, 5, t_hw, t_hw)], None, None, None, None)
        out, target = reg(s, t)
        assert out.shape == target.shape == (2, 5, t_hw, t_hw) and (out >= 0).all()  # ends with a ReLU
    with pytest.raises(ConfigError, match="no regressor maps the student's 4x4"):
        L.HintRegressor((2, 6, 4, 4), (2, 5, 12, 12), layer=3)


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_hint_loss_matches_naive(pair):
    """Through the regressor of the pair's stage-2 maps (a 1x1 conv for all six: their sizes agree)."""
    s, t = pair_features(pair)
    s_shapes, t_shapes = shapes_of(pair.split("-")[1]), shapes_of(pair.split("-")[0])
    torch.manual_seed(0)
    cfg = config.parse(M.Config, ["--hint_layer", "2"])
    reg = L.FitNet(s_shapes, t_shapes, cfg, 0).head.double()
    assert reg.conv.kernel_size == (1, 1)
    f_s, f_t = reg(s, t)
    assert f_s.shape == f_t.shape == (B, *t_shapes.stages[2][1:])
    naive = sum(((f_s[i] - t.stages[2][i]) ** 2).sum() for i in range(B)) / f_s.numel()
    assert_same_value_and_grad(L.hint_loss(f_s, f_t), naive, [s.stages[2], reg.conv.weight])


# ------------------------------------------------ AT ------------------------------------------------

def naive_attention(g_s, g_t):
    total = 0
    for f_s, f_t in zip(g_s, g_t):
        for i in range(B):
            diff = unit(channel_mean_square(f_s[i]).flatten()) - unit(channel_mean_square(f_t[i]).flatten())
            total = total + (diff ** 2).sum() / (B * diff.numel())
    return total


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_attention_loss_matches_naive(pair):
    s, t = pair_features(pair)
    assert len(s.stages[1:]) == len(t.stages[1:]) == (4 if "vgg" in pair else 3)  # RepDistiller's feat[1:-1]
    ours = L.attention_loss(s.stages[1:], t.stages[1:])
    assert_same_value_and_grad(ours, naive_attention(s.stages[1:], t.stages[1:]), s.stages[1:])


# ------------------------------------------------ SP ------------------------------------------------

def naive_similarity(f_s, f_t):
    def gram_rows(f):
        f = f.reshape(B, -1)
        return [unit(torch.stack([f[i] @ f[j] for j in range(B)])) for i in range(B)]

    rows_s, rows_t = gram_rows(f_s), gram_rows(f_t)
    return sum(((rows_t[i] - rows_s[i]) ** 2).sum() for i in range(B)) / B ** 2


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_similarity_loss_matches_naive(pair):
    s, t = pair_features(pair)
    ours = L.similarity_loss(s.stages[-1], t.stages[-1])
    assert_same_value_and_grad(ours, naive_similarity(s.stages[-1], t.stages[-1]), [s.stages[-1]])


# ------------------------------------------------ CC ------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_correlation_loss_matches_naive(pair):
    """Through CC's two embeddings of the pooled features (Linear to 128, no normalisation)."""
    s, t = pair_features(pair)
    torch.manual_seed(0)
    s_shapes, t_shapes = shapes_of(pair.split("-")[1]), shapes_of(pair.split("-")[0])
    embed = L.CC(s_shapes, t_shapes, M.Config(), 0).head.double()
    e_s, e_t = embed(s, t)
    naive_s = torch.stack([embed.embed_s.weight @ s.pooled[i] + embed.embed_s.bias for i in range(B)])
    naive_t = torch.stack([embed.embed_t.weight @ t.pooled[i] + embed.embed_t.bias for i in range(B)])
    naive = sum(((naive_s[i] - naive_t[i]).abs() * (naive_s[i + 1] - naive_t[i + 1]).abs()).sum()
                for i in range(B - 1)) / (B - 1)
    assert_same_value_and_grad(L.correlation_loss(e_s, e_t), naive,
                               [s.pooled, embed.embed_s.weight, embed.embed_t.bias])


# ------------------------------------------------ VID ------------------------------------------------

def naive_vid(head, g_s, g_t):
    """Per layer pair: the regressor as three channel matrix products, sigma^2 = log(1 + e^theta) + 1e-5, the
    Gaussian's negative log-likelihood summed channel by channel, divided by the number of entries."""
    total = 0
    for regressor, theta, f_s, f_t in zip(head.regressors, head.log_scale, g_s, g_t):
        w1, w2, w3 = (regressor[k].weight[:, :, 0, 0] for k in (0, 2, 4))
        mu = torch.einsum("oc,bchw->bohw", w1, f_s).relu()
        mu = torch.einsum("oc,bchw->bohw", w3, torch.einsum("oc,bchw->bohw", w2, mu).relu())
        var = torch.log(1 + torch.exp(theta)) + 1e-5
        nll = sum((0.5 * ((mu[:, c] - f_t[:, c]) ** 2 / var[c] + torch.log(var[c]))).sum() for c in range(len(var)))
        total = total + nll / f_t.numel()
    return total


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_vid_loss_matches_naive(pair):
    s, t = pair_features(pair)
    torch.manual_seed(0)
    s_shapes, t_shapes = shapes_of(pair.split("-")[1]), shapes_of(pair.split("-")[0])
    head = L.VID(s_shapes, t_shapes, M.Config(), 0).head.double()
    assert len(head.regressors) == len(s.stages[1:])
    with torch.no_grad():  # move the variances away from their common initial value
        for theta in head.log_scale:
            theta.add_(torch.randn(theta.shape, dtype=theta.dtype))
    ours = L.vid_loss(*head(s, t))
    naive = naive_vid(head, s.stages[1:], t.stages[1:])
    assert_same_value_and_grad(ours, naive, [*s.stages[1:], head.log_scale[0], head.regressors[-1][0].weight])


def test_vid_variance_starts_at_5_and_the_loss_at_half_log_5_for_a_perfect_mean():
    head = L.VIDRegressors([3, 5], [4, 6]).double()
    for theta in head.log_scale:
        assert torch.allclose(F.softplus(theta) + 1e-5, torch.full_like(theta, 5.0))
    target = [torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)]
    variances = [F.softplus(theta) + 1e-5 for theta in head.log_scale]
    # theta is a float32 parameter: sigma^2 = 5 up to float32 rounding
    assert abs(L.vid_loss(target, target, variances).item() - 2 * 0.5 * math.log(5.0)) < 1e-6


# ------------------------------------------------ RKD ------------------------------------------------

def smooth_l1(x, y):
    d = (x - y).abs()
    return torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


def naive_rkd(f_s, f_t):
    zero = f_s.new_zeros(())

    def distances(e):  # off-diagonal distances are all positive for random features: divide by their mean
        d = torch.stack([torch.stack([((e[i] - e[j]) ** 2).sum().sqrt() if i != j else zero for j in range(B)])
                         for i in range(B)])
        return d / (d.sum() / (B * (B - 1)))

    def angles(e):
        cos = [zero if i in (j, k) else (e[j] - e[i]) @ (e[k] - e[i]) / ((e[j] - e[i]).norm() * (e[k] - e[i]).norm())
               for i in range(B) for j in range(B) for k in range(B)]
        return torch.stack(cos)

    return 25 * smooth_l1(distances(f_s), distances(f_t)) + 50 * smooth_l1(angles(f_s), angles(f_t))


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_rkd_loss_matches_naive(pair):
    s, t = pair_features(pair)
    assert_same_value_and_grad(L.rkd_loss(s.pooled, t.pooled), naive_rkd(s.pooled, t.pooled), [s.pooled])


# ------------------------------------------------ PKT ------------------------------------------------

def naive_pkt(f_s, f_t, eps=1e-7):
    def probabilities(f):
        norms = [(f[i] ** 2).sum().sqrt() + eps for i in range(B)]
        rows = [torch.stack([(f[i] @ f[j] / (norms[i] * norms[j]) + 1) / 2 for j in range(B)]) for i in range(B)]
        return [row / row.sum() for row in rows]

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return sum(p_t[i][j] * torch.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
               for i in range(B) for j in range(B)) / B ** 2


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_pkt_loss_matches_naive(pair):
    s, t = pair_features(pair)
    assert_same_value_and_grad(L.pkt_loss(s.pooled, t.pooled), naive_pkt(s.pooled, t.pooled), [s.pooled])


# ------------------------------------------------ NST ------------------------------------------------

def naive_nst(g_s, g_t):
    """Per layer and image: channel maps divided by their norms, then k(x, y) = (x_c . y_c')^2 one channel c at a
    time, averaged over all channel pairs; the MMD averaged over the images."""
    total = 0
    for f_s, f_t in zip(g_s, g_t):
        for i in range(B):
            a, b = f_s[i].flatten(1), f_t[i].flatten(1)  # (C, HW)
            a, b = a / (a ** 2).sum(1, keepdim=True).sqrt(), b / (b ** 2).sum(1, keepdim=True).sqrt()

            def k(x, y):
                return sum(((y @ x[c]) ** 2).sum() for c in range(len(x))) / (len(x) * len(y))

            total = total + (k(b, b) + k(a, a) - 2 * k(a, b)) / B
    return total


@pytest.mark.parametrize("pair", PAIRS_SWEPT)
def test_nst_loss_matches_naive(pair):
    s, t = pair_features(pair)
    ours = L.nst_loss(s.stages[1:], t.stages[1:])
    assert_same_value_and_grad(ours, naive_nst(s.stages[1:], t.stages[1:]), s.stages[1:])


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
        for b in range(B_REAL):
            s, t = g_s[i][b].flatten(), g_t[i][b].flatten()
            off = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).double()
            on = (s - margin) ** 2 * ((s <= margin) & (t > 0)).double()
            layer = layer + (off + on).sum()
        total = total + weight * layer * 3 / (1000 * B_REAL)
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
    g_t = [torch.randn(B_REAL, 4, 8, 8, dtype=torch.float64), torch.randn(B_REAL, 6, 4, 4, dtype=torch.float64),
           torch.randn(B_REAL, 8, 2, 2, dtype=torch.float64)]
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
    assert factor.shape == (B_REAL, half, *f_t.shape[2:]) and rec.shape == f_t.shape
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
    assert factor_s.shape == (B_REAL, half, *f_s.shape[2:]) and target is t.stages[-1]


def naive_factor(f_s, f_t):
    """Pool to the common size, then per image: channel mean of squares, unit over positions, |difference| summed;
    divided by the number of entries."""
    f_s, f_t = to_common_size(f_s, f_t)
    total = 0
    for b in range(B_REAL):
        a_s, a_t = unit(channel_mean_square(f_s[b]).flatten()), unit(channel_mean_square(f_t[b]).flatten())
        total = total + (a_s - a_t).abs().sum()
    return total / (B_REAL * f_s[0, 0].numel())


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
    x = torch.randn(B_REAL, 5, 4, 4, dtype=torch.float64)
    assert L.factor_loss(x, x).item() == 0
    assert abs(L.factor_loss(-3 * x, x).item()) < 1e-15
    peak, flat = torch.zeros(B_REAL, 5, 4, 4, dtype=torch.float64), torch.ones(B_REAL, 5, 4, 4, dtype=torch.float64)
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
        for b in range(B_REAL):
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
    ones = [torch.ones(B_REAL, c, h, h, dtype=torch.float64) for c, h in sizes]
    zeros = [torch.zeros_like(f) for f in ones]
    assert L.fsp_loss(ones, zeros).item() == 3 and L.fsp_loss(ones, ones).item() == 0
    torch.manual_seed(0)
    g = [torch.randn(B_REAL, c, h, h, dtype=torch.float64) for c, h in sizes]
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
    for b in range(B_REAL):
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
                    total = total + ((rbf_s - rbf_t) ** 2).sum() / B_REAL
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
    # an unrelated student costs something (5e-4 with torch 2.4's seeded init, 1.2e-2 with 2.11-2.14's)
    assert L.kdsvd_loss(s.stages[1:], g).item() > 1e-5


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


# ------------------------------------------------ CRD ------------------------------------------------

def naive_crd(v_s, v_t, bank_s, bank_t, idx, neg, tau, z=None):
    """CRD's loss sample by sample; z = (Z_s, Z_t), or None to fix them from this batch (mean score x N)."""
    N, K, B = bank_s.shape[0], neg.shape[1], v_s.shape[0]
    e_s = torch.stack([torch.stack([torch.exp(bank_t[j] @ v_s[i] / tau) for j in [idx[i]] + neg[i].tolist()])
                       for i in range(B)])
    e_t = torch.stack([torch.stack([torch.exp(bank_s[j] @ v_t[i] / tau) for j in [idx[i]] + neg[i].tolist()])
                       for i in range(B)])
    z = z or (e_s.detach().mean() * N, e_t.detach().mean() * N)
    loss = 0.0
    for e, zz in ((e_s, z[0]), (e_t, z[1])):
        for i in range(B):
            p = e[i] / zz
            loss = loss - torch.log(p[0] / (p[0] + K / N + 1e-7))
            loss = loss - sum(torch.log((K / N) / (p[k] + K / N + 1e-7)) for k in range(1, K + 1))
    return loss / B, z


def test_crd_loss_matches_naive_on_a_tiny_bank(process_group):
    torch.manual_seed(0)
    N, D, B, K, tau = 10, 4, 3, 4, 0.07
    memory = L.CRDMemory(N, D, momentum=0.5)
    bank_s, bank_t = memory.bank_s.clone(), memory.bank_t.clone()
    v_s = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
    v_t = F.normalize(torch.randn(B, D), dim=1).requires_grad_()
    idx, neg = torch.tensor([0, 4, 7]), torch.randint(0, N, (B, K))
    sample = torch.cat([idx[:, None], neg], dim=1)  # the positive (the image itself), then the negatives
    ours = L.crd_loss(v_s, v_t, memory, sample, tau)
    naive, z = naive_crd(v_s, v_t, bank_s, bank_t, idx.tolist(), neg, tau)
    assert torch.allclose(ours, naive, rtol=1e-5)
    assert torch.allclose(memory.z, torch.stack(z))
    g_ours = torch.autograd.grad(ours, [v_s, v_t])
    g_naive = torch.autograd.grad(naive, [v_s, v_t])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_ours, g_naive))
    # The bank update: m * old + (1 - m) * v, re-normalised, only the batch's rows.
    memory.update(v_s.detach(), v_t.detach(), idx)
    assert torch.allclose(memory.bank_s[idx], F.normalize(0.5 * bank_s[idx] + 0.5 * v_s.detach(), dim=1))
    assert torch.allclose(memory.bank_t[idx], F.normalize(0.5 * bank_t[idx] + 0.5 * v_t.detach(), dim=1))
    rest = torch.tensor([i for i in range(N) if i not in idx.tolist()])
    assert torch.equal(memory.bank_s[rest], bank_s[rest])
    # Z stays fixed after the first batch.
    z_first = memory.z.clone()
    second = L.crd_loss(v_s, v_t, memory, sample, tau)
    assert torch.equal(memory.z, z_first)
    naive2, _ = naive_crd(v_s, v_t, memory.bank_s, memory.bank_t, idx.tolist(), neg, tau, z=tuple(z_first))
    assert torch.allclose(second, naive2, rtol=1e-5)


def test_crd_sampler_draws_other_class_negatives():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    base = data.ArrayDataset(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), labels)
    torch.manual_seed(0)
    for k, distinct in ((6, True), (9, False)):  # class 0 has 7 other-class images: 9 > 7 draws with replacement
        ds = L.DistillSet(base, k)
        for i in range(10):
            _, y, index, sample = ds[i]
            pos, neg = sample[0], sample[1:]
            assert index == i == pos and neg.shape == (k,) and (labels[neg] != y).all()  # exact: the positive is i
            assert (len(set(neg.tolist())) == k) == distinct or y == 3
    assert L.DistillSet(base, 0)[3][3].numel() == 0


def test_crd_relax_mode_draws_the_positive_from_the_class():
    """RepDistiller's --mode relax: the positive is a uniformly drawn image of the anchor's class (itself included),
    the negatives are drawn as in exact mode."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    base = data.ArrayDataset(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), labels)
    ds = L.DistillSet(base, 4, relax=True)
    torch.manual_seed(0)
    positives = torch.stack([ds[0][3][0] for _ in range(600)])  # class 0 = images 0, 3, 6
    assert set(positives.tolist()) == {0, 3, 6}
    assert (torch.bincount(positives, minlength=7)[[0, 3, 6]] > 150).all()  # ~200 each
    assert all(ds[9][3][0] == 9 for _ in range(5))  # a class of one: its only image
    assert all((labels[ds[i][3][1:]] != labels[i]).all() for i in range(10))



def test_crd_memory_update_keeps_momentum_on_the_bank():
    """RepDistiller's ContrastMemory: bank[idx] <- normalise(m * bank[idx] + (1 - m) * v), other rows untouched.
    At m = 0.9 (not the default 0.5, where swapping m and 1 - m changes nothing)."""
    torch.manual_seed(0)
    memory = L.CRDMemory(6, 4, momentum=0.9)
    bank_s, bank_t = memory.bank_s.clone(), memory.bank_t.clone()
    v_s, v_t = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    idx = torch.tensor([1, 4])
    memory.update(v_s, v_t, idx)
    for bank, before, v in ((memory.bank_s, bank_s, v_s), (memory.bank_t, bank_t, v_t)):
        torch.testing.assert_close(bank[idx], F.normalize(0.9 * before[idx] + 0.1 * v, dim=1))
        keep = torch.tensor([0, 2, 3, 5])
        assert torch.equal(bank[keep], before[keep])


def _crd_banks_on_each_rank():
    """On each pool rank: CRD's loss on this rank's batch, then the banks updated with the gathered global batch."""
    ctx = dist.setup("cpu")
    torch.manual_seed(0)
    memory = L.CRDMemory(20, 4, 0.5)
    torch.manual_seed(1 + ctx.rank)  # each rank its own batch
    v_s, v_t = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    idx, neg = torch.arange(3) + 3 * ctx.rank, torch.randint(0, 20, (3, 5))
    L.crd_loss(v_s, v_t, memory, torch.cat([idx[:, None], neg], dim=1), 0.07)
    memory.update(dist.gather(v_s), dist.gather(v_t), dist.gather(idx))
    state = dist.gather(torch.cat([memory.bank_s.flatten(), memory.bank_t.flatten(), memory.z])[None])
    unit_rows = int((memory.bank_s.norm(dim=1) - 1).abs().lt(1e-6).sum())  # the updated rows are re-normalised
    return state, unit_rows


def test_crd_banks_and_z_stay_equal_across_ranks(gloo_pool):
    """Every rank updates its banks with the whole global batch and fixes Z with the mean over ranks."""
    outs = gloo_pool.run(_crd_banks_on_each_rank)
    for state, _ in outs:
        assert torch.equal(state[0], state[1]), "the ranks' CRD banks or Z differ"
    assert outs[0][1] == 6  # 2 ranks x 3 rows renormalised


# ------------------------------------------ shared properties ------------------------------------------

def test_identical_features_cost_nothing():
    """Student = teacher: every baseline's loss is zero (VID's is its variance term only)."""
    torch.manual_seed(0)
    f = torch.randn(B, 8, 4, 4, dtype=torch.float64)
    g = [torch.randn(B, 6, 8, 8, dtype=torch.float64), f]
    pooled = torch.randn(B, 16, dtype=torch.float64)
    for loss in (L.hint_loss(f, f), L.attention_loss(g, g), L.similarity_loss(f, f), L.correlation_loss(pooled, pooled),
                 L.rkd_loss(pooled, pooled), L.pkt_loss(pooled, pooled), L.nst_loss(g, g)):
        assert loss.dtype == torch.float64 and abs(loss.item()) < 1e-12


def test_unequal_map_sizes_are_pooled_to_the_smaller():
    """AT, NST and VID average-pool the larger map (student or teacher) to the smaller one's size (RepDistiller)."""
    torch.manual_seed(0)
    big, small = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)
    pooled = F.avg_pool2d(big, 2)  # 8x8 -> 4x4, what adaptive pooling does for an exact factor
    for loss in (L.attention_loss, L.nst_loss):
        assert torch.allclose(loss([big], [small]), loss([pooled], [small]))
        assert torch.allclose(loss([small], [big]), loss([small], [pooled]))
    head = L.VIDRegressors([4], [6]).double()
    mu, target, _ = head(Features([None, big], None, None, None, None), Features([None, small], None, None, None, None))
    assert mu[0].shape == target[0].shape == (2, 6, 4, 4)


def test_bad_hint_layer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"hint_layer=4: choose 0\.\.3"):
        cfg = config.parse(M.Config, ["--hint_layer", "4"])
        L.FitNet(shapes_of("resnet20"), shapes_of("resnet56"), cfg, 0)



# ---------------------------------- one training step of every method, every pair ----------------------------------

def method_config(pair, method):
    """The README cell's config of (pair, method) where RepDistiller's table has one (its weights, the config's own
    teacher and student), else the method on the pair by flags; cut to one step at batch 4."""
    small = ["--batch_size", "4", "--max_steps_per_epoch", "1", "--crd_negatives", "4", "--log_every", "100"]
    cell = os.path.join(RD_CONFIGS, f"{pair}_{method}.yaml")
    if os.path.exists(cell):
        cfg = config.parse(M.Config, ["--config", cell, *small])
        assert (f"{cfg.teacher}-{cfg.student}", cfg.distill) == (pair, method), cell
        return cfg
    t_name, s_name = pair.split("-")
    return config.parse(M.Config, ["--distill", method, "--teacher", t_name, "--student", s_name, "--ifacd_layers",
                                   "3", *small])


class OneForwardTeacher(torch.nn.Module):
    """A frozen teacher that computes its outputs once per input shape and returns them for every later call: the
    step below checks shapes, finiteness and gradients, not values, and the teacher's forward (ResNet50's
    dominates this test) is the same for every method of a pair."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.memo = teacher, {}

    def forward(self, x, features=False):
        key = (tuple(x.shape), features)
        if key not in self.memo:
            self.memo[key] = self.teacher(x, features=features)
        return self.memo[key]


@pytest.mark.sweep
@pytest.mark.parametrize("pair", REPDISTILLER_PAIRS)
def test_every_method_trains_one_step_on_every_pair(process_group, pair, feature_shapes_once):
    """train_one_epoch, one step at batch 3 (RKD's angles need 3): on the slides' six pairs every --distill method
    (kd, crd, ifacd and the baselines), on RepDistiller's seven others each README cell, each from its README config
    where there is one. Each builds its heads and loss state (FitNet's regressor rule, AB's connectors, FT's
    paraphraser, FSP's shape check): no shape error, finite losses (the init stage's too), a positive method term,
    and a gradient for every parameter of the student and the heads (what DDP needs without
    find_unused_parameters). FSP and KDSVD refuse wrn_40_2 -> wrn_40_1 (32 vs 64 channels: the README's 0.00)."""
    t_name, s_name = pair.split("-")
    torch.manual_seed(0)
    teacher = OneForwardTeacher(build_cifar_model(t_name, 10)).requires_grad_(False).eval()
    fresh_student = build_cifar_model(s_name, 10)  # copied for each method (a copy costs less than an init)
    base = data.ArrayDataset(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), torch.arange(8) % 4,
                             augment.linear_train_transform(32))
    probe = torch.randn(2, 3, 32, 32)
    methods = [m for m in M.METHODS[1:]
               if pair in PAIRS or os.path.exists(os.path.join(RD_CONFIGS, f"{pair}_{m}.yaml"))]
    assert len(methods) == (15 if pair in PAIRS else 13 if pair == "resnet110-resnet32" else 12), methods
    for method in methods:
        cfg = method_config(pair, method)
        student = copy.deepcopy(fresh_student)
        if method in ("fsp", "kdsvd") and pair == "wrn_40_2-wrn_40_1":
            with pytest.raises(ConfigError, match="channel"):
                M.build_method(cfg, student, teacher, len(base))
            continue
        built = M.build_method(cfg, student, teacher, len(base))
        model, state = M.Distiller(student, built.head), built.state or torch.nn.Module()
        train_set = L.DistillSet(base, 4 if method == "crd" else 0)
        loader = data.train_loader(train_set, 3, process_group, 0, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        scaler = M.optim.grad_scaler("none", process_group.device)
        step, row = M.train_one_epoch(model, teacher, built, state, loader, optimizer, scaler, cfg,
                                      process_group, 0, 0, 1e-3)
        assert step == 1 and math.isfinite(row["loss"]) and row["kl"] > 0, (method, row)
        # KD's term is the KL term; AB's and FSP's live in the init stage (RepDistiller's main-loop loss_kd = 0)
        assert (row["distill"] > 0) == (method not in ("kd", "abound", "fsp")), (method, row)
        assert all(p.grad is not None for p in model.parameters()), method
        assert (model.heads is not None) == (method in ("crd", "ifacd", "hint", "correlation", "vid", "factor")), method
        if hasattr(built, "init_loss"):  # AB, FT, FSP: the init stage's loss too
            with torch.no_grad():
                t = teacher(probe, features=True)
                s, _ = model(probe, t)
                assert torch.isfinite(built.init_loss(s, t)), method
