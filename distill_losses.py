"""CRD and RepDistiller's twelve other baselines (Tian et al. 2020, METHODS.md section 9), as
RepDistiller implements them (github.com/HobbitLong/RepDistiller `distiller_zoo/*.py`, `crd/*`,
`models/util.py`): the eight of the IFACD slides' CIFAR-100 table (S000), FitNet (hint), AT
(attention), SP (similarity), CC (correlation), VID, RKD, PKT and NST, whose code produced the
slides' numbers (the authors' fork of it, METHODS.md section 8); and KDSVD (kdsvd), AB (abound), FT
(factor) and FSP (fsp). KD and IFACD are in ifacd_distill.py; CRD, which belongs with them, is a
section here because ifacd_distill.py would pass its 450 lines with it. Each loss's docstring says
where RepDistiller's code differs from the paper, and where ours differs from that code.

One section per method: its pure loss functions, its modules, the features it reads and a class
that ifacd_distill.py builds as `Method(s, t, cfg, n_data)` (s, t: the student's and the teacher's
Features as shapes, `common.cifar_models.feature_shapes`; cfg: ifacd_distill.Config; n_data: the
number of training images) and calls, whatever the method, through
- `head`: the module trained with the student in the main loop, inside DDP (checkpointed in
  `model` as `heads.*`), or None; `head(s, t)` -> z runs in the model's forward, under autocast;
- `state`: the module outside DDP (checkpointed as `loss_state`), or None;
- `loss(s, t, z, idx, sample)` -> L_method of the main loop in float32 (idx: the batch's dataset
  indices, sample: what `DistillSet` drew for it; only CRD reads them);
- for the two-stage methods (AB, FT, FSP), RepDistiller's init stage (`helper/pretrain.py`, before
  the main loop): `init_modules(student)`, the modules it trains, `init_lr`, its lr at batch 64,
  `init_reads_student` and `init_loss(s, t)`.
Features: `stages` = RepDistiller's feat[:-1] (the stem, then every stage output), `preact` = the
same with preact=True, `pooled` = feat[-1], `last_stage` (IFACD's). Every loss keeps its inputs'
dtype (the methods pass float32, the tests float64). The teacher's features arrive detached
(computed under no_grad), so no loss detaches them again (RepDistiller's RKD, NST and KDSVD do: no
change for a frozen teacher). The relational losses (SP, CC, RKD, PKT) compare the samples of one
rank's batch (as on RepDistiller's one GPU).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import dist
from common.config import ConfigError

# =================================== what several methods share ===================================

def match_size(f_s, f_t):
    """AT, NST, VID, FT and FSP compare maps of equal size: the larger of the (B, C, H, W) maps is
    average-pooled to the other's H x H (RepDistiller). A no-op for the six pairs of the table,
    whose stage sizes agree."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def floats(maps):
    """The maps in float32, what the methods' losses take."""
    return [f.float() for f in maps]


def regression_conv(s_shape, t_shape):
    """The conv of RepDistiller's `ConvReg` (FitNet's regressor, AB's connectors), mapping the
    student's map (B, C_s, H_s, W_s) to the teacher's (B, C_t, H_t, W_t): a 3x3 stride-2 conv if
    H_s = 2 H_t, a 4x4 stride-2 transposed conv if 2 H_s = H_t, else a conv of kernel 1 + H_s - H_t
    (1x1 for equal sizes); None where RepDistiller raises (a smaller student map that is not half
    the teacher's)."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[1:], t_shape[1:]
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    if 2 * s_h == t_h:
        return nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    if s_h >= t_h:
        return nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    return None


def check_equal_channels(method, s_shapes, t_shapes, where):
    """ConfigError unless the student's and the teacher's lists of maps are equally long with equal
    channels (FSP, KDSVD)."""
    if len(s_shapes) != len(t_shapes):
        raise ConfigError(f"{method}: the student has {len(s_shapes)} maps ({where}) and the "
                          f"teacher {len(t_shapes)}; RepDistiller's {method.upper()} pairs them "
                          f"one to one")
    bad = [f"map {i}: student {s[1]}, teacher {t[1]}"
           for i, (s, t) in enumerate(zip(s_shapes, t_shapes)) if s[1] != t[1]]
    if bad:
        raise ConfigError(f"{method}: the student's and the teacher's channel counts differ "
                          f"({where}; {'; '.join(bad)}); RepDistiller's {method.upper()} compares "
                          f"matrices over the channels of both and refuses such a pair (choose a "
                          f"pair of equal widths)")


# ========================== FitNet (Romero et al. 2015, arXiv:1412.6550) ==========================

class HintRegressor(nn.Module):
    """FitNet's regressor on the hint layer (RepDistiller `ConvReg`): `regression_conv` (1x1 for the
    six pairs of the table, whose sizes agree), then BN and ReLU. forward(s, t) -> (regressed
    student map, the teacher's map) at stage `layer`."""

    def __init__(self, s_shape, t_shape, layer):
        super().__init__()
        self.conv = regression_conv(s_shape, t_shape)
        if self.conv is None:  # RepDistiller raises here too: no rule upsamples by other factors
            raise ConfigError(f"hint: no regressor maps the student's {s_shape[2]}x{s_shape[3]} "
                              f"stage {layer} to the teacher's {t_shape[2]}x{t_shape[3]}; choose "
                              f"another --hint_layer")
        self.bn = nn.BatchNorm2d(t_shape[1])
        self.layer = layer

    def forward(self, s, t):
        return F.relu(self.bn(self.conv(s.stages[self.layer]))), t.stages[self.layer]


def hint_loss(f_s, f_t):
    """FitNet's hint loss L_HT, the regressed guided layer vs the teacher's hint layer (RepDistiller
    `HintLoss`): mean squared error over all elements (the paper's 1/2 sum is folded into gamma).
    f_s: the regressed student map, f_t: the teacher's, both (B, C_t, H_t, W_t)."""
    return F.mse_loss(f_s, f_t)


class FitNet:
    """--distill hint: `HintRegressor` on stage --hint_layer (feat[hint_layer] =
    stages[hint_layer]), trained with the student, and `hint_loss`."""
    state = None

    def __init__(self, s, t, cfg, n_data):
        layer, n = cfg.hint_layer, min(len(s.stages), len(t.stages))
        if not 0 <= layer < n:
            raise ConfigError(f"hint_layer={layer}: choose 0..{n - 1}")
        self.head = HintRegressor(s.stages[layer], t.stages[layer], layer)

    def loss(self, s, t, z, idx, sample):  # z = (regressed student map, the teacher's)
        return hint_loss(z[0].float(), z[1].float())


# ============= AT: attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928) ==============

def attention_map(f, p=2):
    """(B, C, H, W) -> (B, HW): the channel mean of f^p, L2-normalised per image (Sec. 3.1,
    F^p_mean; Eq. 2's Q / ||Q||_2). FT's factor_loss reads it too."""
    return F.normalize(f.pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(g_s, g_t, p=2):
    """AT (Eq. 2, RepDistiller `Attention`): for each pair of maps (B, C, H, W) of the lists g_s,
    g_t (the stage outputs after the stem; zip order, unequal sizes pooled), mean over B x HW of the
    squared difference of the normalised attention maps (RepDistiller squares the difference, the
    paper takes its p-norm); summed over pairs."""
    return sum((attention_map(a, p) - attention_map(b, p)).pow(2).mean()
               for a, b in (match_size(f_s, f_t) for f_s, f_t in zip(g_s, g_t)))


class AT:
    """--distill attention: `attention_loss` of feat[1:-1] = stages[1:]."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return attention_loss(floats(s.stages[1:]), floats(t.stages[1:]))


# ================= SP: similarity preserving (Tung & Mori 2019, arXiv:1907.09682) =================

def similarity_loss(f_s, f_t):
    """SP's loss L_SP (RepDistiller `Similarity`): f_s, f_t (B, ...) of any shapes with the same B
    (the last stage's maps). G = f f^T (B, B) on the flattened features, each row L2-normalised;
    loss = ||G_t - G_s||_F^2 / B^2."""
    b = f_s.shape[0]

    def gram(f):
        f = f.reshape(b, -1)  # (B, C*H*W)
        return F.normalize(f @ f.T, dim=1)

    return (gram(f_t) - gram(f_s)).pow(2).sum() / b ** 2


class SP:
    """--distill similarity: `similarity_loss` of feat[-2] = stages[-1]."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return similarity_loss(s.stages[-1].float(), t.stages[-1].float())


# ================ CC: correlation congruence (Peng et al. 2019, arXiv:1904.01802) =================

class CorrelationEmbed(nn.Module):
    """CC's embeddings (RepDistiller `LinearEmbed`, no normalisation): Linear(d_s -> feat_dim) on
    the student's pooled feature and Linear(d_t -> feat_dim) on the teacher's. forward(s, t) ->
    (e_s, e_t), each (B, feat_dim)."""

    def __init__(self, s_dim, t_dim, feat_dim):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)

    def forward(self, s, t):
        return self.embed_s(s.pooled), self.embed_t(t.pooled)


def correlation_loss(e_s, e_t):
    """CC as RepDistiller runs it (`Correlation`, code the CC authors sent, not the paper's kernel
    form): delta = |e_s - e_t| (B, D); loss = mean over i < B of sum_d delta[i, d] * delta[i + 1,
    d], the correlation of the embedding errors of consecutive samples of the batch."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CC:
    """--distill correlation: `CorrelationEmbed` of feat[-1] = pooled (--feat_dim), trained with the
    student, and `correlation_loss`."""
    state = None

    def __init__(self, s, t, cfg, n_data):
        self.head = CorrelationEmbed(s.pooled[1], t.pooled[1], cfg.feat_dim)

    def loss(self, s, t, z, idx, sample):  # z = (e_s, e_t)
        return correlation_loss(z[0].float(), z[1].float())


# ========= VID: variational information distillation (Ahn et al. 2019, arXiv:1904.05835) ==========

class VIDRegressors(nn.Module):
    """VID's modules, one per pair of stage outputs after the stem (RepDistiller
    `VIDLoss(C_s, C_t, C_t)`): the mean mu(s) = 1x1 conv C_s -> C_t, ReLU, 1x1 C_t -> C_t, ReLU,
    1x1 C_t -> C_t (no biases), and one variance per teacher channel sigma^2_c = softplus(theta_c) +
    eps, theta initialised so that sigma^2 = init_var (the authors' code; RepDistiller writes
    softplus as log(1 + exp(theta)), which overflows for theta > 88 in float32, F.softplus not).
    forward(s, t) -> (means, targets, variances): lists over the pairs (zip: the shorter list's
    length) of (B, C_t, H, W), (B, C_t, H, W), (C_t,)."""

    def __init__(self, s_channels, t_channels, init_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(c_in, c_out):
            return nn.Conv2d(c_in, c_out, 1, bias=False)

        self.regressors = nn.ModuleList(
            nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(),
                          conv1x1(c_t, c_t))
            for c_s, c_t in zip(s_channels, t_channels))
        theta = math.log(math.expm1(init_var - eps))  # softplus(theta) + eps = init_var
        self.log_scale = nn.ParameterList(nn.Parameter(torch.full((c,), theta)) for c in t_channels)
        self.eps = eps

    def forward(self, s, t):
        means, targets, variances = [], [], []
        for regressor, theta, f_s, f_t in zip(self.regressors, self.log_scale, s.stages[1:],
                                              t.stages[1:]):
            f_s, f_t = match_size(f_s, f_t)
            means.append(regressor(f_s))
            targets.append(f_t)
            variances.append(F.softplus(theta) + self.eps)
        return means, targets, variances


def vid_loss(means, targets, variances):
    """VID with a Gaussian of per-channel variance (RepDistiller `VIDLoss`): for each pair, the
    negative Gaussian log-likelihood of the teacher's map under the student's prediction, up to a
    constant, mean over (B, C, H, W): 1/2 [(mu - t)^2 / sigma^2_c + log sigma^2_c]; summed over the
    pairs. Lists as VIDRegressors returns them."""
    return sum((0.5 * ((mu - target).pow(2) / var[:, None, None] + var.log()[:, None, None])).mean()
               for mu, target, var in zip(means, targets, variances))


class VID:
    """--distill vid: `VIDRegressors` of feat[1:-1] = stages[1:], trained with the student, and
    `vid_loss`."""
    state = None

    def __init__(self, s, t, cfg, n_data):
        self.head = VIDRegressors([shape[1] for shape in s.stages[1:]],
                                  [shape[1] for shape in t.stages[1:]])

    def loss(self, s, t, z, idx, sample):  # z = (means, targets, variances)
        return vid_loss(*(floats(part) for part in z))


# ========== RKD: relational knowledge distillation (Park et al. 2019, arXiv:1904.05068) ===========

def pairwise_distance(e, eps=1e-12):
    """(B, D) -> (B, B) Euclidean distances, |a|^2 + |b|^2 - 2 a.b clamped at eps before the root,
    diagonal 0 (RepDistiller `RKDLoss.pdist`)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))  # no grad on the diagonal


def triplet_angles(e):
    """(B, D) -> (B, B, B): [i, j, k] = cos of the angle at e_i between e_j and e_k, from the
    L2-normalised differences (zero vectors where j or k = i)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # (B, B, D): (e_j - e_i) / |e_j - e_i|
    return diff @ diff.transpose(1, 2)


def rkd_loss(f_s, f_t, w_d=25.0, w_a=50.0):
    """RKD-DA, the distance and angle losses with the Huber loss (RepDistiller `RKDLoss`, w_d 25,
    w_a 50): f_s, f_t (B, ...) pooled features. The pairwise distances, each side divided by its
    mean non-zero distance, and the angles of all triplets, compared with smooth-L1 (means over the
    B^2 resp. B^3 entries)."""
    student, teacher = f_s.flatten(1), f_t.flatten(1)
    d_s, d_t = pairwise_distance(student), pairwise_distance(teacher)
    loss_d = F.smooth_l1_loss(d_s / d_s[d_s > 0].mean(), d_t / d_t[d_t > 0].mean())
    loss_a = F.smooth_l1_loss(triplet_angles(student), triplet_angles(teacher))
    return w_d * loss_d + w_a * loss_a


class RKD:
    """--distill rkd: `rkd_loss` of feat[-1] = pooled."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return rkd_loss(s.pooled.float(), t.pooled.float())


# ======== PKT: probabilistic knowledge transfer (Passalis & Tefas 2018, arXiv:1803.10837) =========

def pkt_loss(f_s, f_t, eps=1e-7):
    """PKT with the cosine kernel (RepDistiller `PKT.cosine_similarity_loss`): f_s, f_t (B, D)
    pooled features. Each side: cosine similarities (B, B) mapped to [0, 1] by (c + 1) / 2, rows
    divided by their sums (conditional probabilities); loss = mean over the B^2 entries of p_t
    log((p_t + eps) / (p_s + eps)). RepDistiller also zeroes NaNs after normalising, which only NaN
    inputs produce (then the CE is NaN and the run stops anyway): left out."""

    def probabilities(f):
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        similarity = (f @ f.T + 1) / 2
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT:
    """--distill pkt: `pkt_loss` of feat[-1] = pooled."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return pkt_loss(s.pooled.float(), t.pooled.float())


# ============= NST: neuron selectivity transfer (Huang & Wang 2017, arXiv:1707.01219) =============

def nst_loss(g_s, g_t):
    """NST: squared MMD with the polynomial kernel k(a, b) = (a.b)^2 (d = 2, c = 0; RepDistiller
    `NSTLoss`): for each pair of maps (B, C, H, W) of the lists g_s, g_t (the stage outputs after
    the stem; unequal sizes pooled), every channel's map flattened to HW and L2-normalised; the
    squared MMD mean k(t, t) + mean k(s, s) - 2 mean k(s, t), each mean over B x C x C'; summed over
    pairs. Computed as batched matrix products (B, C, C'): the numbers of RepDistiller's broadcast
    (B, C, C', HW) product without its memory."""
    def kernel_mean(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()

    total = 0
    for f_s, f_t in zip(g_s, g_t):
        f_s, f_t = match_size(f_s, f_t)
        a, b = F.normalize(f_s.flatten(2), dim=2), F.normalize(f_t.flatten(2), dim=2)  # (B, C, HW)
        total = total + kernel_mean(b, b) + kernel_mean(a, a) - 2 * kernel_mean(a, b)
    return total


class NST:
    """--distill nst: `nst_loss` of feat[1:-1] = stages[1:]."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        pass

    def loss(self, s, t, z, idx, sample):
        return nst_loss(floats(s.stages[1:]), floats(t.stages[1:]))


# ======= CRD: contrastive representation distillation (Tian et al. 2020, arXiv:1910.10699) ========

def crd_nce_loss(p, n_data, eps=1e-7):
    """CRD's NCE loss (Eq. 18; RepDistiller `ContrastLoss`). p: (B, 1 + K) scores
    exp(v . m / tau) / Z, column 0 the positive, then the K negatives; noise P_n = 1 / n_data."""
    m = (p.shape[1] - 1) / n_data  # K * P_n
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m + eps))  # the positive: from the data distribution
    log_d0 = torch.log(m / (p[:, 1:] + m + eps))  # the negatives: from the noise distribution
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


class CRDMemory(nn.Module):
    """CRD's two memory banks over the training images (student and teacher embeddings,
    RepDistiller `ContrastMemory`) and the normalisers Z, fixed at the first batch: buffers, all
    three checkpointed."""

    def __init__(self, n_data, dim, momentum):
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)  # RepDistiller's init: U(-stdv, stdv)
        self.register_buffer("bank_s", torch.rand(n_data, dim) * 2 * stdv - stdv)
        self.register_buffer("bank_t", torch.rand(n_data, dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative = not fixed yet
        self.momentum = momentum
        self.z_fixed = None  # whether z is fixed, read from z once (see fix_normalisers)

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded z is read again at the next step
        super()._load_from_state_dict(*args, **kwargs)
        self.z_fixed = None

    @torch.no_grad()
    def fix_normalisers(self, e_s, e_t):
        """Z = mean score x n_data on the first batch, the mean over all ranks (one Z for all). The
        buffer says whether Z is fixed (a resumed run's is); it is read once, not every step:
        reading a device value makes the GPU wait for the host."""
        if self.z_fixed is None:
            self.z_fixed = bool(self.z[0] >= 0)
        if not self.z_fixed:
            means = dist.all_reduce_sum(torch.stack([e_s.mean(), e_t.mean()])) / dist.world_size()
            self.z.copy_(means * self.bank_s.shape[0])
            self.z_fixed = True
        return self.z

    @torch.no_grad()
    def update(self, v_s, v_t, idx):
        """m * bank[idx] + (1 - m) * v, re-normalised; called with the whole global batch so the
        banks stay equal on every rank."""
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            bank[idx] = F.normalize(bank[idx] * self.momentum + v * (1 - self.momentum), dim=1)


def crd_loss(v_s, v_t, memory, sample, temperature):
    """CRD: v_s, v_t (B, D) L2-normalised embeddings; sample (B, 1 + K) dataset indices, column 0
    the positive (the image itself, or an image of its class with --crd_mode relax), then the K
    negatives. Student anchors are scored against the teacher bank and teacher anchors against the
    student bank (Eq. 18, both ways)."""
    e_s = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_t[sample], v_s) / temperature)  # B, 1+K
    e_t = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_s[sample], v_t) / temperature)
    z = memory.fix_normalisers(e_s, e_t)
    n_data = memory.bank_s.shape[0]
    return crd_nce_loss(e_s / z[0], n_data) + crd_nce_loss(e_t / z[1], n_data)


class CRDEmbed(nn.Module):
    """CRD's embeddings: Linear -> L2-norm on the pooled student and teacher features.
    forward(s, t) -> (v_s, v_t)."""

    def __init__(self, s_dim, t_dim, feat_dim):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)

    def forward(self, s, t):
        return (F.normalize(self.embed_s(s.pooled), dim=1),
                F.normalize(self.embed_t(t.pooled), dim=1))


class DistillSet(Dataset):
    """The training items of ifacd_distill.py, every method: (image, label, index, sample). `sample`
    is CRD's (RepDistiller `CIFAR100InstanceSample`): 1 + K dataset indices, the positive first,
    then K other-class images, uniform without replacement (with replacement if fewer than K exist);
    an empty tensor when K = 0. The positive is the image itself (mode 'exact') or, with relax=True,
    a uniformly drawn image of its class (mode 'relax'; possibly itself). Drawn with torch's RNG
    (RepDistiller: numpy's), which the loop reseeds every epoch, so a resumed run is bit-exact."""

    def __init__(self, base, k, relax=False):
        self.base, self.k, self.relax = base, k, relax
        self.order = torch.argsort(base.labels, stable=True)  # dataset indices grouped by class
        self.count = torch.bincount(base.labels)
        self.start = torch.cumsum(self.count, 0) - self.count  # class c: order[start[c]:][:count]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if not self.k:
            return x, y, i, torch.empty(0, dtype=torch.long)
        start, count = int(self.start[y]), int(self.count[y])
        positive = (self.order[start + torch.randint(count, (1,))] if self.relax
                    else torch.tensor([i]))
        m = len(self.order) - count  # number of other-class images
        j = torch.randperm(m)[:self.k] if self.k <= m else torch.randint(m, (self.k,))
        return x, y, i, torch.cat([positive, self.order[j + count * (j >= start)]])  # skip class y


class CRD:
    """--distill crd: `CRDEmbed` of feat[-1] = pooled (--feat_dim), trained with the student;
    `CRDMemory` (--crd_momentum), the state; `crd_loss` at --nce_temperature, over the
    --crd_negatives that `DistillSet` draws."""

    def __init__(self, s, t, cfg, n_data):
        self.head = CRDEmbed(s.pooled[1], t.pooled[1], cfg.feat_dim)
        self.state = CRDMemory(n_data, cfg.feat_dim, cfg.crd_momentum)
        self.temperature = cfg.nce_temperature

    def loss(self, s, t, z, idx, sample):  # z = (v_s, v_t)
        v_s, v_t = z[0].float(), z[1].float()
        loss = crd_loss(v_s, v_t, self.state, sample, self.temperature)
        # the banks move after scoring, before the backward (RepDistiller: ContrastMemory.forward)
        self.state.update(dist.gather(v_s.detach()), dist.gather(v_t.detach()), dist.gather(idx))
        return loss


# ====== AB: activation boundaries (Heo et al. 2019, arXiv:1811.03233; RepDistiller `ABLoss`) ======

class ConvBN(nn.Module):
    """One of AB's connectors (RepDistiller `ConvReg(use_relu=False)`): `regression_conv` then BN,
    no ReLU."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.conv = regression_conv(s_shape, t_shape)
        if self.conv is None:
            raise ConfigError(f"abound: no connector maps the student's {s_shape[2]}x{s_shape[3]} "
                              f"map to the teacher's {t_shape[2]}x{t_shape[3]} (RepDistiller's "
                              f"ConvReg only upsamples by 2)")
        self.bn = nn.BatchNorm2d(t_shape[1])

    def forward(self, x):
        return self.bn(self.conv(x))


class Connector(nn.Module):
    """AB's connectors (RepDistiller `Connector`), one per pair of maps: the identity where the
    student's map has the teacher's channels and height (then nothing is trained: all of
    resnet32x4 -> resnet8x4), else `ConvBN` (a 1x1 conv for equal sizes, 3x3 stride 2 or 4x4
    transposed stride 2 across a factor of 2). The paper's connector is a 1x1 conv + BN everywhere.
    s_shapes, t_shapes: the pre-activation maps after the stem (RepDistiller feat[1:-1] with
    preact=True, `Features.preact[1:]`), equally many (RepDistiller asserts it).
    forward(list of student maps) -> list of maps of the teacher's shapes."""

    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ConfigError(f"abound: the student has {len(s_shapes)} stage outputs and the "
                              f"teacher {len(t_shapes)}; RepDistiller's connectors pair them "
                              f"one to one")
        self.connectors = nn.ModuleList(
            nn.Identity() if (s[1], s[2]) == (t[1], t[2]) else ConvBN(s, t)
            for s, t in zip(s_shapes, t_shapes))

    def forward(self, g_s):
        return [connector(f) for connector, f in zip(self.connectors, g_s)]


def ab_loss(g_s, g_t, margin=1.0):
    """AB's alternative loss (RepDistiller `ABLoss`, the constants of the authors' code): g_s the
    connectors' outputs, g_t the teacher's pre-activation maps, lists of (B, C_t, H, W). Per
    element: ReLU(m - s)^2 where the teacher's neuron is active (t > 0), ReLU(m + s)^2 where not
    (t <= 0), margin m = 1; summed over each map, the map of pair i of n weighted 2^(i - n + 1) (the
    deepest 1, then 1/2, 1/4, ...), divided by the batch size and multiplied by 3/1000; summed over
    pairs. The paper states one unweighted squared norm; the layer weights and 3/1000 are its
    code's."""
    n, b = len(g_s), g_s[0].shape[0]
    total = 0
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        hinge = torch.where(f_t > 0, F.relu(margin - f_s), F.relu(margin + f_s))
        total = total + 2.0 ** (i - n + 1) * hinge.pow(2).sum() / b / 1000 * 3
    return total


class AB:
    """--distill abound, two-stage: the init stage trains the `Connector` (the state) and the
    student's feature modules on `ab_loss` of feat[1:-1] with preact=True (`preact[1:]`); the main
    loop adds no term (RepDistiller's loss_kd = 0: CE and KL only, as weighted)."""
    head = None
    init_reads_student = True

    def __init__(self, s, t, cfg, n_data):
        self.state = Connector(s.preact[1:], t.preact[1:])
        self.init_lr = cfg.lr

    def loss(self, s, t, z, idx, sample):
        return torch.zeros((), device=s.logits.device)

    def init_modules(self, student):
        return [self.state, student.feat_modules()]

    def init_loss(self, s, t):  # outside autocast, as every loss: the connectors run in float32
        return ab_loss(floats(self.state(floats(s.preact[1:]))), floats(t.preact[1:]))


# ===== FT: factor transfer (Kim et al. 2018, arXiv:1802.04977; RepDistiller `FactorTransfer`) =====

def _leaky_stack(conv, widths, use_bn):
    """[conv, BN or identity, LeakyReLU(0.1)] per (c_in, c_out) of `widths`, 3x3 stride 1 padding 1
    (size kept); the layer indices of RepDistiller's Sequentials (its empty Sequential where use_bn
    is off), so its state dicts load."""
    layers = []
    for c_in, c_out in widths:
        layers += [conv(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out) if use_bn else nn.Identity(),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """FT's paraphraser of the teacher's last stage output (RepDistiller `Paraphraser`, no BN):
    encoder 3x3 convs C -> C -> int(k C) -> int(k C), decoder 3x3 transposed convs
    int(k C) -> int(k C) -> C -> C, each followed by LeakyReLU(0.1); k = 0.5. t_shape: the teacher's
    feat[-2] = `stages[-1]` (B, C, H, W).
    - factor(f_t) = the encoder's output (B, int(k C), H, W), the teacher's factor;
    - reconstruct(f_t) = decoder(encoder(f_t)) (B, C, H, W), what the init stage trains."""

    def __init__(self, t_shape, k=0.5, use_bn=False):
        super().__init__()
        c, f = t_shape[1], int(t_shape[1] * k)
        self.encoder = _leaky_stack(nn.Conv2d, [(c, c), (c, f), (f, f)], use_bn)
        self.decoder = _leaky_stack(nn.ConvTranspose2d, [(f, f), (f, c), (c, c)], use_bn)

    def factor(self, f_t):
        return self.encoder(f_t)

    def reconstruct(self, f_t):
        return self.decoder(self.encoder(f_t))


def reconstruction_loss(rec, f_t):
    """The paraphraser's init-stage loss (RepDistiller `nn.MSELoss()(rec, f_t)`): mean squared error
    over all elements (the paper's ||x - P(x)||^2 up to that mean)."""
    return F.mse_loss(rec, f_t)


class Translator(nn.Module):
    """FT's translator of the student's last stage output (RepDistiller `Translator`, with BN): 3x3
    convs C_s -> C_s -> int(k C_t) -> int(k C_t), each followed by BN and LeakyReLU(0.1); k = 0.5,
    so its factor has the paraphraser's channels. s_shape, t_shape: feat[-2] = `stages[-1]` of
    student and teacher. forward(s, t) -> (the student's factor (B, int(k C_t), H_s, W_s) of
    s.stages[-1], the teacher's map t.stages[-1] that the paraphraser encodes)."""

    def __init__(self, s_shape, t_shape, k=0.5, use_bn=True):
        super().__init__()
        c, f = s_shape[1], int(t_shape[1] * k)
        self.encoder = _leaky_stack(nn.Conv2d, [(c, c), (c, f), (f, f)], use_bn)

    def forward(self, s, t):
        return self.encoder(s.stages[-1]), t.stages[-1]


def factor_loss(factor_s, factor_t):
    """FT's loss as RepDistiller computes it (`FactorTransfer`, p1 = 2, p2 = 1): factor_s the
    translator's output, factor_t the paraphraser's, (B, C, H, W) each (unequal sizes pooled to the
    smaller); each reduced to AT's `attention_map` (channel mean of the squared factor,
    L2-normalised over the H W positions), then the mean over B x HW of the absolute difference. The
    paper normalises the whole factor (C H W values) and takes the L1 norm of the difference, not a
    mean, and no channel mean of squares."""
    factor_s, factor_t = match_size(factor_s, factor_t)
    return (attention_map(factor_s) - attention_map(factor_t)).abs().mean()


class FT:
    """--distill factor, two-stage, on feat[-2] = stages[-1]: the init stage trains the
    `Paraphraser` (the state) alone to reconstruct the teacher's map (`reconstruction_loss`; the
    student is not run: RepDistiller computes its features there and discards them, in eval mode);
    the main loop trains the `Translator` with the student on `factor_loss` against the
    paraphraser's factor of the teacher's map, the paraphraser frozen (eval mode, no gradient)."""
    init_reads_student = False

    def __init__(self, s, t, cfg, n_data):
        self.head = Translator(s.stages[-1], t.stages[-1])
        self.state = Paraphraser(t.stages[-1])
        # RepDistiller's init-stage lr: 0.01 for its resnet and wrn students (not ResNet50)
        self.init_lr = 0.01 if cfg.student.startswith(("resnet", "wrn")) else cfg.lr

    def loss(self, s, t, z, idx, sample):  # z = (the student's factor, the teacher's map)
        factor_s, f_t = z
        with torch.no_grad():  # outside autocast, as every loss: the paraphraser runs in float32
            factor_t = self.state.factor(f_t.float())
        return factor_loss(factor_s.float(), factor_t)

    def init_modules(self, student):
        return [self.state]

    def init_loss(self, s, t):
        f_t = t.stages[-1].float()  # outside autocast: the paraphraser runs in float32
        return reconstruction_loss(self.state.reconstruct(f_t), f_t)


# ========== FSP: flow of solution procedure (Yim et al. 2017, CVPR; RepDistiller `FSP`) ===========

def check_fsp_shapes(s_shapes, t_shapes):
    """Refuses (ConfigError) what RepDistiller's FSP refuses: s_shapes, t_shapes the shapes of
    feat[:-1] = `stages`, unequally many (its assert) or any map whose channel count differs between
    student and teacher (its ValueError 'num of channels not equal'); sizes are not checked
    (pooled). Hence no FSP number for wrn_40_2 -> wrn_40_1 (0.00 in its README) nor for any pair of
    different architectures in its table."""
    check_equal_channels("fsp", s_shapes, t_shapes, "feat[:-1], the stem and every stage output")


def fsp_matrices(g):
    """The FSP matrices of consecutive maps of the list g (RepDistiller `FSP.compute_fsp`): for
    bottom = g[i], top = g[i + 1], the larger one average-pooled to the other's H x H, then
    G[b, j, c] = mean over the HW positions of top[b, j] * bottom[b, c], (B, C_top, C_bottom). The
    paper pairs a layer with one of the same resolution (the input and output of a group of blocks)
    and needs no pooling."""
    return [top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / top[0, 0].numel()
            for bottom, top in (match_size(g[i], g[i + 1]) for i in range(len(g) - 1))]


def fsp_loss(g_s, g_t):
    """FSP's loss (RepDistiller `FSP`): g_s, g_t the lists feat[:-1] = `stages` (the stem, then
    every stage output), accepted by `check_fsp_shapes`. For each pair of consecutive maps, the mean
    over (B, C_top, C_bottom) of the squared difference of the FSP matrices; summed over the pairs
    (the paper sums the squared entries with equal weights lambda_i and averages over the samples
    only)."""
    return sum((a - b).pow(2).mean() for a, b in zip(fsp_matrices(g_s), fsp_matrices(g_t)))


class FSP:
    """--distill fsp, two-stage: the init stage trains the student's feature modules on `fsp_loss`
    of feat[:-1] = stages; the main loop adds no term (RepDistiller's loss_kd = 0)."""
    head = state = None
    init_reads_student = True

    def __init__(self, s, t, cfg, n_data):
        check_fsp_shapes(s.stages, t.stages)
        self.init_lr = cfg.lr

    def loss(self, s, t, z, idx, sample):
        return torch.zeros((), device=s.logits.device)

    def init_modules(self, student):
        return [student.feat_modules()]

    def init_loss(self, s, t):
        return fsp_loss(floats(s.stages), floats(t.stages))


# ============= KDSVD: SVD distillation (Lee et al. 2018, ECCV; RepDistiller `KDSVD`) ==============

def check_kdsvd_shapes(s_shapes, t_shapes):
    """Refuses (ConfigError) a pair KDSVD cannot compare: its student's singular vectors are aligned
    to the teacher's by their cosines over the channels, and its RBF matrices (C_i x C_(i-1))
    compared entrywise, so every map of feat[1:-1] = `stages[1:]` needs the teacher's channel count
    (RepDistiller does not check and fails in a matrix product: e.g. wrn_40_2 -> wrn_40_1)."""
    check_equal_channels("kdsvd", s_shapes, t_shapes,
                         "feat[1:-1], the stage outputs after the stem")


def leading_vectors_with_gradient(x, v, sigma, n):
    """The n leading right singular vectors v[:, :, :n] of x (B, HW, C) in value, with the
    derivative of perturbation theory: for a leading v_j, dv_j = sum over i != j of v_i (v_i^T dG
    v_j) / (l_j - l_i), G = x^T x, l = sigma^2, i over a complete basis (the directions beyond the r
    = min(HW, C) computed ones have l = 0; their part is the projection of dG v_j off span(v), /
    l_j). This is torch's SVD gradient for these vectors, without its terms between pairs of the
    other vectors: those are multiplied by a zero upstream gradient, but where two singular values
    are equal (ReLU-dead channels: repeated zeros) torch computes 0 / 0 = NaN. Pairs with equal l
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
    """(B, C, H, W) -> (sigma (B, n), V (B, C, n)) of RepDistiller's `KDSVD.svd`: the SVD of each
    map as an (HW, C) matrix (positions x channels), non-finite entries set to 0, the n largest
    singular values L2-normalised together (for n = 1: 1) and the n leading right singular vectors
    (over the channels), each L2-normalised (already unit: a no-op in value and gradient). Their
    signs are LAPACK's (cuSOLVER's on a GPU), as torch.svd's. The gradient reaches x through V only
    (KDSVD uses the teacher's sigma alone), by `leading_vectors_with_gradient`: torch's SVD gradient
    where that is finite, and finite where ReLU-dead channels make it NaN (RepDistiller relies on
    torch.svd's autograd and gets the NaN)."""
    x = f.flatten(2).transpose(1, 2)  # (B, HW, C)
    with torch.no_grad():
        _, sigma, vh = torch.linalg.svd(x, full_matrices=False)  # the numbers of torch.svd(x)
    sigma = torch.where(torch.isfinite(sigma), sigma, torch.zeros_like(sigma))
    v = vh.transpose(1, 2)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    if x.requires_grad:
        v = leading_vectors_with_gradient(x, v, sigma, n)
    return F.normalize(sigma[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_singular_vectors(v_s, v_t):
    """RepDistiller `KDSVD.align_rsv`: v_s (B, C, n_s), v_t (B, C, n_t) -> (B, C, n_t), for each
    teacher vector the student vector of largest |cosine| with it, times the sign of that cosine
    (the sum of them on a tie). The selection and the signs carry no gradient (sign and
    comparisons), so the result is v_s times a constant matrix."""
    with torch.no_grad():
        cosine = v_s.transpose(1, 2) @ v_t  # (B, n_s, n_t)
        best = cosine.abs().amax(dim=1, keepdim=True)
        pick = torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))
    return v_s @ pick


def kdsvd_loss(g_s, g_t, k=1):
    """KDSVD (RepDistiller `KDSVD`, k = 1): g_s, g_t the lists feat[1:-1] = `stages[1:]`, equal
    channels per map (`check_kdsvd_shapes`). Per map: the teacher's k leading right singular vectors
    V_t and the student's k + 3 (`top_singular`), the student's aligned to the teacher's
    (`align_singular_vectors`), both multiplied by the teacher's normalised singular values (all 1
    for k = 1). For consecutive maps i - 1, i the RBF matrices R[b, c, c', j] = exp(-(V_i[b, c, j] -
    V_(i-1)[b, c', j])^2 / 8), (B, C_i, C_(i-1), k); loss term i = the sum of (R_s - R_t)^2
    (non-finite entries set to 0) over all entries, / B; summed over i = 1..n-1. RepDistiller ports
    the authors' first TensorFlow version but not its hand-written SVD gradient (it relies on
    torch.svd's autograd, as here) and detaches R_t (a no-op: the teacher's maps carry no gradient).
    The value depends on the signs the SVD routine gives the teacher's vectors (the student's are
    aligned to them), as in RepDistiller; the paper leaves them undetermined."""
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
            finite = torch.where(torch.isfinite(square), square, torch.zeros_like(square))
            total = total + finite.sum() / b
        previous = v_s, v_t
    return total


class KDSVD:
    """--distill kdsvd (RepDistiller's scripts give it no weight): `kdsvd_loss` of
    feat[1:-1] = stages[1:], refusing a pair of unequal channels (`check_kdsvd_shapes`)."""
    head = state = None

    def __init__(self, s, t, cfg, n_data):
        check_kdsvd_shapes(s.stages[1:], t.stages[1:])

    def loss(self, s, t, z, idx, sample):
        return kdsvd_loss(floats(s.stages[1:]), floats(t.stages[1:]))


# RepDistiller's baselines as ifacd_distill.py offers them (--distill), after its own KD, CRD, IFACD
METHODS = {"hint": FitNet, "attention": AT, "similarity": SP, "correlation": CC, "vid": VID,
           "rkd": RKD, "pkt": PKT, "nst": NST, "kdsvd": KDSVD, "abound": AB, "factor": FT,
           "fsp": FSP}
