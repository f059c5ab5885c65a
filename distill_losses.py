"""The eight other baselines of the IFACD slides' CIFAR-100 table (S000): FitNet (hint), AT (attention), SP
(similarity), CC (correlation), VID, RKD, PKT and NST, as RepDistiller implements them (Tian et al. 2020,
github.com/HobbitLong/RepDistiller `distiller_zoo/*.py`, `models/util.py`; METHODS.md section 9), whose code produced
the slides' numbers (the authors' fork of it, METHODS.md section 8). KD, CRD and IFACD live in ifacd_distill.py.

One pure loss function per method, named after it, and an nn.Module only where the method owns parameters (FitNet's
regressor, CC's embeddings, VID's regressors and variances). Each module's forward(s, t) takes the student's and the
teacher's `common.cifar_models.Features` and returns what its loss takes. `build_head` and `baseline_loss` at the end
are what ifacd_distill.py calls: they pick RepDistiller's features for each method (METHODS.md section 9), with
`stages` = RepDistiller's feat[:-1] (the stem, then every stage output) and `pooled` = feat[-1].
- Every loss keeps its inputs' dtype (the script passes float32, the tests float64).
- The teacher's features arrive detached (computed under no_grad), so no loss detaches them again (RepDistiller's
  RKD and NST do, which changes nothing for a frozen teacher).
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

class HintRegressor(nn.Module):
    """FitNet's regressor on the hint layer (RepDistiller `ConvReg`): maps the student's map (B, C_s, H_s, W_s) to
    the teacher's (B, C_t, H_t, W_t) by a 3x3 stride-2 conv if H_s = 2 H_t, a 4x4 stride-2 transposed conv if
    2 H_s = H_t, else a conv of kernel 1 + H_s - H_t (1x1 for equal sizes: all six pairs), then BN and ReLU.
    forward(s, t) -> (regressed student map, the teacher's map) at stage `layer` (RepDistiller hint_layer 2)."""

    def __init__(self, s_shape, t_shape, layer):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:  # RepDistiller raises here too: no rule upsamples by other factors
            raise ConfigError(f"hint: no regressor maps the student's {s_h}x{s_w} stage {layer} to the teacher's "
                              f"{t_h}x{t_w}; choose another --hint_layer")
        self.bn = nn.BatchNorm2d(t_c)
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


# ----------------------- which features each baseline reads (RepDistiller `helper/loops.py`) -----------------------

BASELINES = ("hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "nst")


def build_head(method, s, t, feat_dim=128, hint_layer=2):
    """The trainable module of a baseline, or None (AT, SP, RKD, PKT and NST own no parameters). s, t: the
    student's and the teacher's Features as shapes (`common.cifar_models.feature_shapes`)."""
    if method == "hint":  # FitNet's regressor on stage hint_layer
        if not 0 <= hint_layer < min(len(s.stages), len(t.stages)):
            raise ConfigError(f"hint_layer={hint_layer}: choose 0..{min(len(s.stages), len(t.stages)) - 1}")
        return HintRegressor(s.stages[hint_layer], t.stages[hint_layer], hint_layer)
    if method == "correlation":  # embeddings of the pooled features (feat[-1])
        return CorrelationEmbed(s.pooled[1], t.pooled[1], feat_dim)
    if method == "vid":  # one regressor per pair of stage outputs after the stem (zip: the shorter list's length)
        return VIDRegressors([shape[1] for shape in s.stages[1:]], [shape[1] for shape in t.stages[1:]])
    return None


def baseline_loss(method, s, t, z):
    """L_method of a baseline in float32 (the loss ifacd_distill.py weights by gamma). s, t: the student's and the
    teacher's Features; z: the output of build_head's module (None for the parameter-free methods). RepDistiller's
    feat[1:-1] = stages[1:] (AT, NST, VID), feat[-2] = stages[-1] (SP), feat[-1] = pooled (CC, RKD, PKT)."""
    if method in ("hint", "correlation"):  # (regressed student map, teacher's map) or (e_s, e_t)
        return (hint_loss if method == "hint" else correlation_loss)(z[0].float(), z[1].float())
    if method == "vid":  # z = (means, targets, variances), lists over the pairs
        return vid_loss(*([f.float() for f in part] for part in z))
    if method in ("attention", "nst"):
        g_s, g_t = [f.float() for f in s.stages[1:]], [f.float() for f in t.stages[1:]]
        return attention_loss(g_s, g_t) if method == "attention" else nst_loss(g_s, g_t)
    if method == "similarity":
        return similarity_loss(s.stages[-1].float(), t.stages[-1].float())
    if method in ("rkd", "pkt"):
        return (rkd_loss if method == "rkd" else pkt_loss)(s.pooled.float(), t.pooled.float())
    raise ValueError(f"{method} is not one of {BASELINES}")
