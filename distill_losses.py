"""The twelve other baselines of RepDistiller (Tian et al. 2020, github.com/HobbitLong/RepDistiller
`distiller_zoo/*.py`, `models/util.py`; METHODS.md section 9), as it implements them: the eight of the IFACD slides'
CIFAR-100 table (S000), FitNet (hint), AT (attention), SP (similarity), CC (correlation), VID, RKD, PKT and NST, whose
code produced the slides' numbers (the authors' fork of it, METHODS.md section 8); and AB (abound), FT (factor), FSP
(fsp) and KDSVD (kdsvd). KD, CRD and IFACD live in ifacd_distill.py.

One pure loss function per method, named after it, and an nn.Module only where the method owns parameters (FitNet's
regressor, CC's embeddings, VID's regressors and variances, AB's connectors, FT's paraphraser and translator). Each
module's forward(s, t) takes the student's and the teacher's `common.cifar_models.Features` and returns what its loss
takes (AB's Connector and FT's Paraphraser, which only RepDistiller's init stage trains, take maps). `build_head` and
`baseline_loss` at the end are what ifacd_distill.py calls for the one-stage methods (KDSVD included): they pick
RepDistiller's features for each method (METHODS.md section 9), with `stages` = RepDistiller's feat[:-1] (the stem,
then every stage output), `preact` = the same with preact=True (AB) and `pooled` = feat[-1]. The two-stage methods
AB, FT and FSP are wired in ifacd_distill.py itself, from the functions and modules of their section.
- Every loss keeps its inputs' dtype (the script passes float32, the tests float64).
- The teacher's features arrive detached (computed under no_grad), so no loss detaches them again (RepDistiller's
  RKD, NST and KDSVD do, which changes nothing for a frozen teacher).
- The relational losses (SP, CC, RKD, PKT) compare the samples of one rank's batch (as on RepDistiller's one GPU).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.config import ConfigError


def match_size(f_s, f_t):
    """AT, NST and VID compare maps of equal size: the larger of the (B, C, H, W) maps is average-pooled to the
    other's H x H (RepDistiller). A no-op for the six pairs of the table, whose stage sizes agree."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


# ------------------------------ FitNet (Romero et al. 2015, arXiv:1412.6550) ------------------------------

def regression_conv(s_shape, t_shape):
    """The conv of RepDistiller's `ConvReg` (FitNet's regressor, AB's connectors), mapping the student's map
    (B, C_s, H_s, W_s) to the teacher's (B, C_t, H_t, W_t): a 3x3 stride-2 conv if H_s = 2 H_t, a 4x4 stride-2
    transposed conv if 2 H_s = H_t, else a conv of kernel 1 + H_s - H_t (1x1 for equal sizes); None where
    RepDistiller raises (a smaller student map that is not half the teacher's)."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    if 2 * s_h == t_h:
        return nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    if s_h >= t_h:
        return nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    return None


class HintRegressor(nn.Module):
    """FitNet's regressor on the hint layer (RepDistiller `ConvReg`): `regression_conv` (1x1 for the six pairs of
    the table, whose sizes agree), then BN and ReLU. forward(s, t) -> (regressed student map, the teacher's map) at
    stage `layer` (RepDistiller hint_layer 2)."""

    def __init__(self, s_shape, t_shape, layer):
        super().__init__()
        self.conv = regression_conv(s_shape, t_shape)
        if self.conv is None:  # RepDistiller raises here too: no rule upsamples by other factors
            raise ConfigError(f"hint: no regressor maps the student's {s_shape[2]}x{s_shape[3]} stage {layer} to the "
                              f"teacher's {t_shape[2]}x{t_shape[3]}; choose another --hint_layer")
        self.bn = nn.BatchNorm2d(t_shape[1])
        self.layer = layer

    def forward(self, s, t):
        return F.relu(self.bn(self.conv(s.stages[self.layer]))), t.stages[self.layer]


def hint_loss(f_s, f_t):
    """FitNet's hint loss L_HT, the regressed guided layer vs the teacher's hint layer (RepDistiller `HintLoss`):
    mean squared error over all elements (the paper's 1/2 sum is folded into gamma). f_s: the regressed student
    map, f_t: the teacher's, both (B, C_t, H_t, W_t)."""
    return F.mse_loss(f_s, f_t)


# -------------------- AT: attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928) --------------------

def attention_map(f, p=2):
    """(B, C, H, W) -> (B, HW): the channel mean of f^p, L2-normalised per image (Sec. 3.1, F^p_mean; Eq. 2's
    Q / ||Q||_2)."""
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(g_s, g_t, p=2):
    """AT (Eq. 2, RepDistiller `Attention`): for each pair of maps (B, C, H, W) of the lists g_s, g_t (the stage
    outputs after the stem; zip order, unequal sizes pooled), mean over B x HW of the squared difference of the
    normalised attention maps (RepDistiller squares the difference, the paper takes its p-norm); summed over pairs."""
    return sum((attention_map(a, p) - attention_map(b, p)).pow(2).mean()
               for a, b in (match_size(f_s, f_t) for f_s, f_t in zip(g_s, g_t)))


# ---------------------- SP: similarity preserving (Tung & Mori 2019, arXiv:1907.09682) ----------------------

def similarity_loss(f_s, f_t):
    """SP's loss L_SP (RepDistiller `Similarity`): f_s, f_t (B, ...) of any shapes with the same B (the last stage's
    maps). G = f f^T (B, B) on the flattened features, each row L2-normalised; loss = ||G_t - G_s||_F^2 / B^2."""
    b = f_s.shape[0]

    def gram(f):
        f = f.reshape(b, -1)  # (B, C*H*W)
        return F.normalize(f @ f.T, dim=1)

    return (gram(f_t) - gram(f_s)).pow(2).sum() / b ** 2


# ------------------------- CC: correlation congruence (Peng et al. 2019, arXiv:1904.01802) -------------------------

class CorrelationEmbed(nn.Module):
    """CC's embeddings (RepDistiller `LinearEmbed`, no normalisation): Linear(d_s -> feat_dim) on the student's pooled
    feature and Linear(d_t -> feat_dim) on the teacher's. forward(s, t) -> (e_s, e_t), each (B, feat_dim)."""

    def __init__(self, s_dim, t_dim, feat_dim):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)

    def forward(self, s, t):
        return self.embed_s(s.pooled), self.embed_t(t.pooled)


def correlation_loss(e_s, e_t):
    """CC as RepDistiller runs it (`Correlation`, code the CC authors sent, not the paper's kernel form):
    delta = |e_s - e_t| (B, D); loss = mean over i < B of sum_d delta[i, d] * delta[i + 1, d], the correlation of
    the embedding errors of consecutive samples of the batch."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


# ------------------ VID: variational information distillation (Ahn et al. 2019, arXiv:1904.05835) ------------------

class VIDRegressors(nn.Module):
    """VID's modules, one per pair of stage outputs after the stem (RepDistiller `VIDLoss(C_s, C_t, C_t)`): the mean
    mu(s) = 1x1 conv C_s -> C_t, ReLU, 1x1 C_t -> C_t, ReLU, 1x1 C_t -> C_t (no biases), and one variance per teacher
    channel sigma^2_c = softplus(theta_c) + eps, theta initialised so that sigma^2 = init_var (the authors' code;
    RepDistiller writes softplus as log(1 + exp(theta)), which overflows for theta > 88 in float32, F.softplus not).
    forward(s, t) -> (means, targets, variances): lists over the pairs of (B, C_t, H, W), (B, C_t, H, W), (C_t,)."""

    def __init__(self, s_channels, t_channels, init_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(c_in, c_out):
            return nn.Conv2d(c_in, c_out, 1, bias=False)

        self.regressors = nn.ModuleList(
            nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(), conv1x1(c_t, c_t))
            for c_s, c_t in zip(s_channels, t_channels))
        theta = math.log(math.expm1(init_var - eps))  # softplus(theta) + eps = init_var
        self.log_scale = nn.ParameterList(nn.Parameter(torch.full((c,), theta)) for c in t_channels)
        self.eps = eps

    def forward(self, s, t):
        means, targets, variances = [], [], []
        for regressor, theta, f_s, f_t in zip(self.regressors, self.log_scale, s.stages[1:], t.stages[1:]):
            f_s, f_t = match_size(f_s, f_t)
            means.append(regressor(f_s))
            targets.append(f_t)
            variances.append(F.softplus(theta) + self.eps)
        return means, targets, variances


def vid_loss(means, targets, variances):
    """VID with a Gaussian of per-channel variance (RepDistiller `VIDLoss`): for each pair, the negative Gaussian
    log-likelihood of the teacher's map under the student's prediction, up to a constant, mean over (B, C, H, W):
    1/2 [(mu - t)^2 / sigma^2_c + log sigma^2_c]; summed over the pairs. Lists as VIDRegressors returns them."""
    return sum((0.5 * ((mu - target).pow(2) / var[:, None, None] + var.log()[:, None, None])).mean()
               for mu, target, var in zip(means, targets, variances))


# -------------------- RKD: relational knowledge distillation (Park et al. 2019, arXiv:1904.05068) --------------------

def pairwise_distance(e, eps=1e-12):
    """(B, D) -> (B, B) Euclidean distances, |a|^2 + |b|^2 - 2 a.b clamped at eps before the root, diagonal 0
    (RepDistiller `RKDLoss.pdist`)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))  # no gradient through the diagonal


def triplet_angles(e):
    """(B, D) -> (B, B, B): [i, j, k] = cos of the angle at e_i between e_j and e_k, from the L2-normalised
    differences (zero vectors where j or k = i)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # (B, B, D): [i, j] = (e_j - e_i) / |e_j - e_i|
    return diff @ diff.transpose(1, 2)


def rkd_loss(f_s, f_t, w_d=25.0, w_a=50.0):
    """RKD-DA, the distance and angle losses with the Huber loss (RepDistiller `RKDLoss`, w_d 25, w_a 50):
    f_s, f_t (B, ...) pooled features. The pairwise distances, each side divided by its mean non-zero distance,
    and the angles of all triplets, compared with smooth-L1 (means over the B^2 resp. B^3 entries)."""
    student, teacher = f_s.flatten(1), f_t.flatten(1)
    d_s, d_t = pairwise_distance(student), pairwise_distance(teacher)
    loss_d = F.smooth_l1_loss(d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean())
    loss_a = F.smooth_l1_loss(triplet_angles(student), triplet_angles(teacher))
    return w_d * loss_d + w_a * loss_a


# ---------------- PKT: probabilistic knowledge transfer (Passalis & Tefas 2018, arXiv:1803.10837) ----------------

def pkt_loss(f_s, f_t, eps=1e-7):
    """PKT with the cosine kernel (RepDistiller `PKT.cosine_similarity_loss`): f_s, f_t (B, D) pooled
    features. Each side: cosine similarities (B, B) mapped to [0, 1] by (c + 1) / 2, rows divided by their sums
    (conditional probabilities); loss = mean over the B^2 entries of p_t log((p_t + eps) / (p_s + eps)).
    RepDistiller also zeroes NaNs after normalising, which only NaN inputs produce (then the CE is NaN and the run
    stops anyway): left out."""

    def probabilities(f):
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        similarity = (f @ f.T + 1) / 2
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ------------------- NST: neuron selectivity transfer (Huang & Wang 2017, arXiv:1707.01219) -------------------

def nst_loss(g_s, g_t):
    """NST: squared MMD with the polynomial kernel k(a, b) = (a.b)^2 (d = 2, c = 0; RepDistiller `NSTLoss`): for
    each pair of maps (B, C, H, W) of the lists g_s, g_t (the stage outputs after the stem; unequal sizes pooled),
    every channel's map flattened to HW and L2-normalised; the squared MMD
    mean k(t, t) + mean k(s, s) - 2 mean k(s, t), each mean over B x C x C'; summed over pairs. Computed as batched
    matrix products (B, C, C'): the numbers of RepDistiller's broadcast (B, C, C', HW) product without its memory."""
    def kernel_mean(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()

    total = 0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = match_size(f_s, f_t)
        a, b = F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2)  # (B, C, HW)
        total = total + kernel_mean(b, b) + kernel_mean(a, a) - 2 * kernel_mean(a, b)
    return total


# ====================== RepDistiller's other four: AB, FT, FSP (two-stage) and KDSVD ======================
# AB, FT and FSP train something in RepDistiller's init stage (`helper/pretrain.py`, --init_epochs 30, no CE or KD)
# before the main loop; ifacd_distill.py runs both stages and calls what is below directly.

# ------------- AB: activation boundaries (Heo et al. 2019, arXiv:1811.03233; RepDistiller `ABLoss`) -------------

class ConvBN(nn.Module):
    """One of AB's connectors (RepDistiller `ConvReg(use_relu=False)`): `regression_conv` then BN, no ReLU."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.conv = regression_conv(s_shape, t_shape)
        if self.conv is None:
            raise ConfigError(f"abound: no connector maps the student's {s_shape[2]}x{s_shape[3]} map to the "
                              f"teacher's {t_shape[2]}x{t_shape[3]} (RepDistiller's ConvReg only upsamples by 2)")
        self.bn = nn.BatchNorm2d(t_shape[1])

    def forward(self, x):
        return self.bn(self.conv(x))


class Connector(nn.Module):
    """AB's connectors (RepDistiller `Connector`), one per pair of maps: the identity where the student's map has
    the teacher's channels and height (then nothing is trained: all of resnet32x4 -> resnet8x4), else `ConvBN`
    (a 1x1 conv for equal sizes, 3x3 stride 2 or 4x4 transposed stride 2 across a factor of 2). The paper's
    connector is a 1x1 conv + BN everywhere. s_shapes, t_shapes: the pre-activation maps after the stem (RepDistiller
    feat[1:-1] with preact=True, `Features.preact[1:]`), equally many (RepDistiller asserts it).
    forward(list of student maps) -> list of maps of the teacher's shapes."""

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ConfigError(f"abound: the student has {len(s_shapes)} stage outputs and the teacher "
                              f"{len(t_shapes)}; RepDistiller's connectors pair them one to one")
        self.connectors = nn.ModuleList(
            nn.Identity() if (s[1], s[2]) == (t[1], t[2]) else ConvBN(s, t) for s, t in zip(s_shapes, t_shapes))

    def forward(self, g_s):
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


def ab_loss(g_s, g_t, margin=1.0):
    """AB's alternative loss (RepDistiller `ABLoss`, the constants of the authors' code): g_s the connectors'
    outputs, g_t the teacher's pre-activation maps, lists of (B, C_t, H, W). Per element: ReLU(m - s)^2 where the
    teacher's neuron is active (t > 0), ReLU(m + s)^2 where not (t <= 0), margin m = 1; summed over each map, the
    map of pair i of n weighted 2^(i - n + 1) (the deepest 1, then 1/2, 1/4, ...), divided by the batch size and
    multiplied by 3/1000; summed over pairs. The paper states one unweighted squared norm; the layer weights and
    3/1000 are its code's. In RepDistiller only the init stage uses it (the main loop's AB term is 0)."""
    n, b = len(g_s), g_s[0].shape[0]
    total = 0
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        hinge = torch.where(f_t > 0, F.relu(margin - f_s), F.relu(margin + f_s))
        total = total + 2.0 ** (i - n + 1) * hinge.pow(2).sum() / b / 1000 * 3
    return total


# ------------- FT: factor transfer (Kim et al. 2018, arXiv:1802.04977; RepDistiller `FactorTransfer`) -------------

def _leaky_stack(conv, widths, use_bn):
    """[conv, BN or identity, LeakyReLU(0.1)] per (c_in, c_out) of `widths`, 3x3 stride 1 padding 1 (size kept);
    the layer indices of RepDistiller's Sequentials (its empty Sequential where use_bn is off), so its state dicts
    load."""
    layers = []
    for c_in, c_out in widths:
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if use_bn else nn.Identity(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser of the teacher's last stage output (RepDistiller `Paraphraser`, no BN): encoder 3x3 convs
    C -> C -> int(k C) -> int(k C), decoder 3x3 transposed convs int(k C) -> int(k C) -> C -> C, each followed by
    LeakyReLU(0.1); k = 0.5. t_shape: the teacher's feat[-2] = `stages[-1]` (B, C, H, W).
    - factor(f_t) = the encoder's output (B, int(k C), H, W), the teacher's factor of the main loop (RepDistiller
      runs it frozen, in eval mode);
    - reconstruct(f_t) = decoder(encoder(f_t)) (B, C, H, W), trained in the init stage by the MSE to f_t
      (`reconstruction_loss`; learning rate 0.01 for resnet/wrn students, RepDistiller `helper/pretrain.py`);
    - forward(f_t, is_factor=False) as RepDistiller's: the factor if is_factor, else (factor, reconstruction)."""

    def __init__(self, t_shape, k=0.5, use_bn=False):
        super().__init__()
        c, f = t_shape[1], int(t_shape[1] * k)
        self.encoder = _leaky_stack(nn.Conv2d, [(c, c), (c, f), (f, f)], use_bn)
        self.decoder = _leaky_stack(nn.ConvTranspose2d, [(f, f), (f, c), (c, c)], use_bn)

    def factor(self, f_t):
        return self.encoder(f_t)

    def reconstruct(self, f_t):
        return self.decoder(self.encoder(f_t))

    def forward(self, f_t, is_factor=False):
        factor = self.encoder(f_t)
        return factor if is_factor else (factor, self.decoder(factor))


def reconstruction_loss(rec, f_t):
    """The paraphraser's init-stage loss (RepDistiller `nn.MSELoss()(rec, f_t)`): mean squared error over all
    elements (the paper's ||x - P(x)||^2 up to that mean)."""
    return F.mse_loss(rec, f_t)


class Translator(nn.Module):
    """FT's translator of the student's last stage output (RepDistiller `Translator`, with BN): 3x3 convs
    C_s -> C_s -> int(k C_t) -> int(k C_t), each followed by BN and LeakyReLU(0.1); k = 0.5, so its factor has the
    paraphraser's channels. s_shape, t_shape: feat[-2] = `stages[-1]` of student and teacher. forward(s, t) ->
    the student's factor (B, int(k C_t), H_s, W_s) of s.stages[-1] (t unused; `encoder` takes a map)."""

    def __init__(self, s_shape, t_shape, k=0.5, use_bn=True):
        super().__init__()
        c, f = s_shape[1], int(t_shape[1] * k)
        self.encoder = _leaky_stack(nn.Conv2d, [(c, c), (c, f), (f, f)], use_bn)

    def forward(self, s, t=None):
        return self.encoder(s.stages[-1])


def factor_loss(factor_s, factor_t):
    """FT's loss as RepDistiller computes it (`FactorTransfer`, p1 = 2, p2 = 1): factor_s the translator's output,
    factor_t the paraphraser's, (B, C, H, W) each (unequal sizes pooled to the smaller); each reduced to AT's
    attention map (channel mean of the squared factor, L2-normalised over the H W positions, `attention_map`), then
    the mean over B x HW of the absolute difference. The paper normalises the whole factor (C H W values) and takes
    the L1 norm of the difference, not a mean, and no channel mean of squares."""
    factor_s, factor_t = match_size(factor_s, factor_t)
    return (attention_map(factor_s) - attention_map(factor_t)).abs().mean()


# ------------- FSP: flow of solution procedure (Yim et al. 2017, CVPR; RepDistiller `FSP`) -------------

def _check_equal_channels(method, s_shapes, t_shapes, where):
    """ConfigError unless the student's and the teacher's lists of maps are equally long with equal channels."""
    if len(s_shapes) != len(t_shapes):
        raise ConfigError(f"{method}: the student has {len(s_shapes)} maps ({where}) and the teacher "
                          f"{len(t_shapes)}; RepDistiller's {method.upper()} pairs them one to one")
    bad = [f"map {i}: student {s[1]}, teacher {t[1]}" for i, (s, t) in enumerate(zip(s_shapes, t_shapes))
           if s[1] != t[1]]
    if bad:
        raise ConfigError(f"{method}: the student's and the teacher's channel counts differ ({where}; "
                          f"{'; '.join(bad)}); RepDistiller's {method.upper()} compares matrices over the channels "
                          f"of both and refuses such a pair (choose a pair of equal widths)")


def check_fsp_shapes(s_shapes, t_shapes):
    """Refuses (ConfigError) what RepDistiller's FSP refuses: s_shapes, t_shapes the shapes of feat[:-1] =
    `stages`, unequally many (its assert) or any map whose channel count differs between student and teacher (its
    ValueError 'num of channels not equal'); sizes are not checked (pooled). Hence no FSP number for
    wrn_40_2 -> wrn_40_1 (0.00 in its README) nor for any pair of different architectures in its table."""
    _check_equal_channels("fsp", s_shapes, t_shapes, "feat[:-1], the stem and every stage output")


def fsp_matrices(g):
    """The FSP matrices of consecutive maps of the list g (RepDistiller `FSP.compute_fsp`): for bottom = g[i],
    top = g[i + 1], the larger one average-pooled to the other's H x H, then G[b, j, c] = mean over the HW positions
    of top[b, j] * bottom[b, c], (B, C_top, C_bottom). The paper pairs a layer with one of the same resolution (the
    input and output of a group of blocks) and needs no pooling."""
    return [top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / top[0, 0].numel()
            for bottom, top in (match_size(g[i], g[i + 1]) for i in range(len(g) - 1))]


def fsp_loss(g_s, g_t):
    """FSP's loss (RepDistiller `FSP`): g_s, g_t the lists feat[:-1] = `stages` (the stem, then every stage
    output), accepted by `check_fsp_shapes`. For each pair of consecutive maps, the mean over (B, C_top, C_bottom)
    of the squared difference of the FSP matrices; summed over the pairs (the paper sums the squared entries with
    equal weights lambda_i and averages over the samples only). In RepDistiller only the init stage uses it (the
    main loop's FSP term is 0)."""
    return sum((a - b).pow(2).mean() for a, b in zip(fsp_matrices(g_s), fsp_matrices(g_t)))


# ------------- KDSVD: SVD distillation (Lee et al. 2018, ECCV; RepDistiller `KDSVD`) -------------

def check_kdsvd_shapes(s_shapes, t_shapes):
    """Refuses (ConfigError) a pair KDSVD cannot compare: its student's singular vectors are aligned to the
    teacher's by their cosines over the channels, and its RBF matrices (C_i x C_(i-1)) compared entrywise, so every
    map of feat[1:-1] = `stages[1:]` needs the teacher's channel count (RepDistiller does not check and fails in a
    matrix product: e.g. wrn_40_2 -> wrn_40_1)."""
    _check_equal_channels("kdsvd", s_shapes, t_shapes, "feat[1:-1], the stage outputs after the stem")


def leading_vectors_with_gradient(x, v, sigma, n):
    """The n leading right singular vectors v[:, :, :n] of x (B, HW, C) in value, with the derivative of
    perturbation theory: for a leading v_j, dv_j = sum over i != j of v_i (v_i^T dG v_j) / (l_j - l_i), G = x^T x,
    l = sigma^2, i over a complete basis (the directions beyond the r = min(HW, C) computed ones have l = 0; their
    part is the projection of dG v_j off span(v), / l_j). This is torch's SVD gradient for these vectors, without
    its terms between pairs of the other vectors: those are multiplied by a zero upstream gradient, but where two
    singular values are equal (ReLU-dead channels: repeated zeros) torch computes 0 / 0 = NaN. Pairs with equal l
    among the leading ones have no derivative; their term is left at 0."""
    g = x.transpose(1, 2) @ x  # (B, C, C), differentiable
    dg = g - g.detach()  # zero in value, G's gradient
    lam, lead = sigma.pow(2), v[:, :, :n]
    gap = lam[:, None, :n] - lam[:, :, None]  # (B, r, n): l_j - l_i
    inverse = torch.where(gap != 0, 1 / gap, torch.zeros_like(gap))  # also 0 for i = j
    dv = v @ (inverse * (v.transpose(1, 2) @ dg @ lead))
    if v.shape[2] < v.shape[1]:  # fewer positions than channels: the null space of x
        moved = dg @ lead
        scale = torch.where(lam[:, :n] > 0, 1 / lam[:, :n], torch.zeros_like(lam[:, :n]))
        dv = dv + (moved - v @ (v.transpose(1, 2) @ moved)) * scale[:, None, :]
    return lead + dv


def top_singular(f, n):
    """(B, C, H, W) -> (sigma (B, n), V (B, C, n)) of RepDistiller's `KDSVD.svd`: the SVD of each map as an
    (HW, C) matrix (positions x channels), non-finite entries set to 0, the n largest singular values L2-normalised
    together (for n = 1: 1) and the n leading right singular vectors (over the channels), each L2-normalised
    (already unit: a no-op in value and gradient). Their signs are LAPACK's (cuSOLVER's on a GPU), as torch.svd's.
    The gradient reaches x through V only (KDSVD uses the teacher's sigma alone), by
    `leading_vectors_with_gradient`: torch's SVD gradient where that is finite, and finite where ReLU-dead channels
    make it NaN (RepDistiller relies on torch.svd's autograd and gets the NaN)."""
    x = f.flatten(2).transpose(1, 2)  # (B, HW, C)
    with torch.no_grad():
        _, sigma, vh = torch.linalg.svd(x, full_matrices=False)  # the numbers torch.svd(x) returns (U unused)
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))
    v = vh.transpose(1, 2)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    if x.requires_grad:
        v = leading_vectors_with_gradient(x, v, sigma, n)
    return F.normalize(sigma[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_singular_vectors(v_s, v_t):
    """RepDistiller `KDSVD.align_rsv`: v_s (B, C, n_s), v_t (B, C, n_t) -> (B, C, n_t), for each teacher vector the
    student vector of largest |cosine| with it, times the sign of that cosine (the sum of them on a tie). The
    selection and the signs carry no gradient (sign and comparisons), so the result is v_s times a constant
    matrix."""
    with torch.no_grad():
        cosine = v_s.transpose(1, 2) @ v_t  # (B, n_s, n_t)
        best = cosine.abs().amax(dim=1, keepdim=True)
        pick = torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))
    return v_s @ pick


def kdsvd_loss(g_s, g_t, k=1):
    """KDSVD (RepDistiller `KDSVD`, k = 1): g_s, g_t the lists feat[1:-1] = `stages[1:]`, equal channels per map
    (`check_kdsvd_shapes`). Per map: the teacher's k leading right singular vectors V_t and the student's k + 3
    (`top_singular`), the student's aligned to the teacher's (`align_singular_vectors`), both multiplied by the
    teacher's normalised singular values (all 1 for k = 1). For consecutive maps i - 1, i the RBF matrices
    R[b, c, c', j] = exp(-(V_i[b, c, j] - V_(i-1)[b, c', j])^2 / 8), (B, C_i, C_(i-1), k); loss term i = the sum of
    (R_s - R_t)^2 (non-finite entries set to 0) over all entries, / B; summed over i = 1..n-1.
    RepDistiller ports the authors' first TensorFlow version but not its hand-written SVD gradient (it relies on
    torch.svd's autograd, as here) and detaches R_t (a no-op: the teacher's maps carry no gradient). The value
    depends on the signs the SVD routine gives the teacher's vectors (the student's are aligned to them), as in
    RepDistiller; the paper leaves them undetermined."""
    b = g_s[0].shape[0]
    total, previous = 0, None
    for f_s, f_t in zip(g_s, g_t):
        sigma_t, v_t = top_singular(f_t, k)
        _, v_s = top_singular(f_s, k + 3)
        v_s = align_singular_vectors(v_s, v_t)
        v_s, v_t = v_s * sigma_t[:, None, :], v_t * sigma_t[:, None, :]
        if previous is not None:
            rbf_s, rbf_t = (torch.exp(-(v[:, :, None, :] - v_prev[:, None, :, :]).pow(2) / 8)
                            for v, v_prev in ((v_s, previous[0]), (v_t, previous[1])))
            square = (rbf_s - rbf_t).pow(2)
            total = total + torch.where(torch.isfinite(square), square, torch.zeros_like(square)).sum() / b
        previous = v_s, v_t
    return total


# ----------------------- which features each baseline reads (RepDistiller `helper/loops.py`) -----------------------

BASELINES = ("hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "nst", "kdsvd")


def build_head(method, s, t, feat_dim=128, hint_layer=2):
    """The trainable module of a baseline, or None (AT, SP, RKD, PKT, NST and KDSVD own no parameters). s, t: the
    student's and the teacher's Features as shapes (`common.cifar_models.feature_shapes`). Refuses (ConfigError) a
    pair KDSVD cannot compare (`check_kdsvd_shapes`)."""
    if method == "hint":  # FitNet's regressor on stage hint_layer
        if not 0 <= hint_layer < min(len(s.stages), len(t.stages)):
            raise ConfigError(f"hint_layer={hint_layer}: choose 0..{min(len(s.stages), len(t.stages)) - 1}")
        return HintRegressor(s.stages[hint_layer], t.stages[hint_layer], hint_layer)
    if method == "correlation":  # embeddings of the pooled features (feat[-1])
        return CorrelationEmbed(s.pooled[1], t.pooled[1], feat_dim)
    if method == "vid":  # one regressor per pair of stage outputs after the stem (zip: the shorter list's length)
        return VIDRegressors([shape[1] for shape in s.stages[1:]], [shape[1] for shape in t.stages[1:]])
    if method == "kdsvd":
        check_kdsvd_shapes(s.stages[1:], t.stages[1:])
    return None


def baseline_loss(method, s, t, z):
    """L_method of a baseline in float32 (the loss ifacd_distill.py weights by gamma). s, t: the student's and the
    teacher's Features; z: the output of build_head's module (None for the parameter-free methods). RepDistiller's
    feat[1:-1] = stages[1:] (AT, NST, VID, KDSVD), feat[-2] = stages[-1] (SP), feat[-1] = pooled (CC, RKD, PKT)."""
    if method in ("hint", "correlation"):  # (regressed student map, teacher's map) or (e_s, e_t)
        return (hint_loss if method == "hint" else correlation_loss)(z[0].float(), z[1].float())
    if method == "vid":  # z = (means, targets, variances), lists over the pairs
        return vid_loss(*([f.float() for f in part] for part in z))
    if method in ("attention", "nst", "kdsvd"):
        g_s, g_t = [f.float() for f in s.stages[1:]], [f.float() for f in t.stages[1:]]
        return {"attention": attention_loss, "nst": nst_loss, "kdsvd": kdsvd_loss}[method](g_s, g_t)
    if method == "similarity":
        return similarity_loss(s.stages[-1].float(), t.stages[-1].float())
    if method in ("rkd", "pkt"):
        return (rkd_loss if method == "rkd" else pkt_loss)(s.pooled.float(), t.pooled.float())
    raise ValueError(f"{method} is not one of {BASELINES}")
