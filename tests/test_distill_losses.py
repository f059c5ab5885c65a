"""distill_losses.py: the eight RepDistiller baselines against naive loop references (value and gradient, float64) on
features of every pair's real shapes, their modules' shape rules, analytic cases, and one training step of every
--distill method on every pair of the slides' table."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from common import augment, config, data
from common.cifar_models import Features, build_cifar_model, feature_shapes
from common.config import ConfigError

import distill_losses as L
import ifacd_distill as M

PAIRS = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "vgg13-vgg8", "resnet56-resnet20", "resnet32x4-resnet8x4",
         "resnet110-resnet20"]
B = 4  # batch of the loss checks: RKD's angles need 3 samples, CC's consecutive pairs 2


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
def test_similarity_loss_matches_naive(pair):
    s, t = pair_features(pair)
    ours = L.similarity_loss(s.stages[-1], t.stages[-1])
    assert_same_value_and_grad(ours, naive_similarity(s.stages[-1], t.stages[-1]), [s.stages[-1]])


# ------------------------------------------------ CC ------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
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


@pytest.mark.parametrize("pair", PAIRS)
def test_nst_loss_matches_naive(pair):
    s, t = pair_features(pair)
    ours = L.nst_loss(s.stages[1:], t.stages[1:])
    assert_same_value_and_grad(ours, naive_nst(s.stages[1:], t.stages[1:]), s.stages[1:])


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

@pytest.mark.parametrize("pair", PAIRS)
def test_every_method_trains_one_step_on_every_pair(process_group, pair):
    """train_one_epoch, one step at batch 4, for kd, crd, ifacd and the eight baselines: no shape error, finite
    losses, a positive method term, and a gradient for every parameter of the student and the heads (what DDP
    needs without find_unused_parameters)."""
    t_name, s_name = pair.split("-")
    torch.manual_seed(0)
    teacher = build_cifar_model(t_name, 10).requires_grad_(False).eval()
    base = data.ArrayDataset(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8), torch.arange(8) % 4,
                             augment.linear_train_transform(32))
    for method in M.METHODS[1:]:
        cfg = config.parse(M.Config, ["--distill", method, "--teacher", t_name, "--student", s_name,
                                      "--batch_size", "4", "--max_steps_per_epoch", "1", "--crd_negatives", "4",
                                      "--ifacd_layers", "3", "--log_every", "100"])
        student = build_cifar_model(s_name, 10)
        if method in ("fsp", "kdsvd") and pair == "wrn_40_2-wrn_40_1":  # 32 vs 64 channels: RepDistiller's 0.00
            with pytest.raises(ConfigError, match="channels"):
                M.build_method(cfg, student, teacher, len(base))
            continue
        built = M.build_method(cfg, student, teacher, len(base))
        model, state = M.Distiller(student, built.head), built.state or torch.nn.Module()
        train_set = L.DistillSet(base, 4 if method == "crd" else 0)
        loader = data.train_loader(train_set, 4, process_group, 0, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        scaler = M.optim.grad_scaler("none", process_group.device)
        step, row = M.train_one_epoch(model, teacher, built, state, loader, optimizer, scaler, cfg,
                                      process_group, 0, 0, 1e-3)
        assert step == 1 and math.isfinite(row["loss"]) and row["kl"] > 0, (method, row)
        # KD's term is the KL term; AB's and FSP's live in the init stage (RepDistiller's main-loop loss_kd = 0)
        assert (row["distill"] > 0) == (method not in ("kd", "abound", "fsp")), (method, row)
        assert all(p.grad is not None for p in model.parameters()), method
        assert (model.heads is not None) == (method in ("crd", "ifacd", "hint", "correlation", "vid", "factor")), method
