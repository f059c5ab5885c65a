"""IFACD: Intermediate Features Augmented Contrastive Distillation (Rios et al., slides S000), with KD, CRD and the
rest of RepDistiller's CIFAR-100 benchmark.

A frozen teacher (trained first by this script with `--distill none`) supervises a CIFAR-100 student through
    L = alpha * CE(student, y) + beta * KL(T = 4) + gamma * L_method                          (S000 "Methodology")
- kd:    L_method = 0: the KL term alone (Hinton et al. 2015, arXiv:1503.02531).
- crd:   CRD (Tian et al. 2020, arXiv:1910.10699, Eq. 18): linear embeddings of the pooled student and teacher
         features, two momentum memory banks (one row per training image), 16384 other-class negatives per anchor,
         NCE with the fixed normaliser Z, both directions (student anchors vs the teacher bank and vice versa).
         --crd_mode relax: the positive is a random image of the anchor's class instead of the image itself.
- ifacd: the teacher's last n ReLU outputs of the last stage, pooled, each mapped by its own rescaler (Linear + BN)
         to the teacher's width, then a projector shared by the teacher layers (the student has its own) to 128-d;
         SupCon 'all' without labels over the (B, 1 + n, 128) views: the views of an image are positives of each
         other, every view of every other image is a negative (METHODS.md section 8).
- hint, attention, similarity, correlation, vid, rkd, pkt, nst: the slides' other baselines, RepDistiller's FitNet,
         AT, SP, CC, VID, RKD, PKT and NST (METHODS.md section 9): their losses and small modules are in
         distill_losses.py, with the choice of features each one reads (`build_head`, `baseline_loss`).
- kdsvd, abound, factor, fsp: the rest of RepDistiller's methods, KDSVD, AB, FT and FSP (losses in distill_losses.py).
         AB, FT and FSP are two-stage, as RepDistiller runs them: an init stage of --init_epochs (30) epochs first
         (`init_stage`: AB trains the connectors and the student's feature modules on the activation-boundary loss of
         the pre-ReLU stage outputs, FT the paraphraser to reconstruct the teacher's last stage, FSP the student's
         feature modules on the FSP matrices), numbered epochs -init_epochs..-1 in log.jsonl and the checkpoint; then
         the main loop, where FT adds its translator's factor loss and AB and FSP add nothing (RepDistiller's
         `loss_kd = 0`: only CE and KL, as weighted).
- none:  the model trains alone with CE: this is how teachers (and the "student vanilla" row) are made.

Reproduces the S000 CIFAR-100 table (top-1 of the last epoch; six teacher -> student pairs; configs in
configs/ifacd_distill/, runner scripts/run_table.py). Recipe of the authors' RepDistiller fork (METHODS.md section 8):
SGD Nesterov momentum 0.9, lr 0.05 at batch 64, wd 5e-4 (not on biases/BN), 240 epochs, x0.1 after 150/180/210,
RandomCrop(32, 4) + flip, tau 0.07, feature dim 128. The test set is evaluated exactly (every image once, over ranks).
Known deviations
- gamma (the weight of L_method) is not given in S000 and the fork has no run script: the configs use RepDistiller's
  weight b of each method (crd 0.8, hint 100, attention 1000, similarity 3000, correlation 0.02, vid 1, rkd 1,
  pkt 30000, nst 50) and 0.8 for ifacd, marked as a guess in each YAML.
- Multi-GPU runs are exact for the losses (IFACD gathers all views with gradient; CRD updates the banks with the whole
  global batch and fixes Z with the mean over ranks) but BN statistics are per GPU unless --sync_bn (CUDA only).
  The paper setting is one GPU with batch 64.
- CRD negatives are drawn with torch's RNG (not numpy's) so that a resumed run is bit-exact.
- The init stage (AB, FT, FSP) runs outside DDP: its gradients are averaged over ranks by hand and rank 0's BN
  statistics copied to every rank after each epoch (RepDistiller: one GPU). FT's init stage does not run the
  student, whose features RepDistiller computes there and discards (in eval mode: no effect).
- The eight baselines follow RepDistiller's code where it differs from their papers (CC, AT's squared difference);
  distill_losses.py names the few places where it differs from that code (none changes a loss beyond rounding).
- RepDistiller's own recipe (plain SGD, wd on every parameter) is `--nesterov false --exclude_bias_norm false`.
- lr is given at batch 64 and scaled linearly with batch_size (RepDistiller keeps 0.05 whatever the batch; the fork
  uses 0.2 x B/256); the two agree at the paper's batch 64.
- Peak memory (log.jsonl, CUDA): peak_mem_reserved_gb = torch.cuda.max_memory_reserved over the whole run (kept across
  resumes), as the fork records the slides' 'Memory Requirements'; peak_mem_gb = the epoch's max_memory_allocated; on
  the CPU peak_rss_gb (it also holds the dataset and torch: compare methods, not with the slides). train_time_s: wall
  seconds of training + testing over the whole run (kept across resumes), the slides' 'Training Time'.
Checkpoint: `model` = student (keys `student.*`, RepDistiller's parameter names) + trainable distillation heads
(`heads.*`: CRD/CC embeddings, IFACD rescalers and projectors, FitNet/VID regressors); `loss_state` = CRD's banks
and Z, AB's connectors or FT's paraphraser (empty otherwise); `init_optimizer` for AB, FT and FSP.

Run
    python ifacd_distill.py --config configs/ifacd_distill/vanilla_wrn_40_2.yaml                 # teacher, 1 GPU
    python ifacd_distill.py --config configs/ifacd_distill/wrn_40_2-wrn_16_2_ifacd2.yaml         # student, 1 GPU
    torchrun --standalone --nproc_per_node=4 ifacd_distill.py --config configs/ifacd_distill/vgg13-vgg8_crd.yaml
    python ifacd_distill.py --dataset fake --distill none --student resnet8 --epochs 1 --max_steps_per_epoch 2 \
        --device cpu                                                                             # CPU smoke run
    python scripts/run_table.py ifacd --seeds 0 1 2                       # the whole table: every method, all pairs
    python scripts/run_table.py repdistiller --seeds 0 1 2         # RepDistiller's README tables (its own recipe)
"""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import distill_losses as L
from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.cifar_models import CIFAR_MODELS, build_cifar_model, feature_shapes, load_teacher
from common.config import ConfigError, arg
from common.log import print0

MEAN_STD = {"cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),  # RepDistiller dataset/cifar100.py
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3), "mnist": ((0.1307,) * 3, (0.3081,) * 3)}
NUM_CLASSES = {"cifar100": 100, "cifar10": 10, "fashion_mnist": 10, "mnist": 10, "fake": 10}
METHODS = ("none", "kd", "crd", "ifacd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt", "nst",
           "kdsvd", "abound", "factor", "fsp")
TWO_STAGE = ("abound", "factor", "fsp")  # RepDistiller's init stage (helper/pretrain.py) runs before the main loop
HEADS_COUNTED_TWICE = ("crd", "ifacd")  # in both module_list and criterion_list of RepDistiller/the fork (section 10)


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = arg("cifar100", "training images (fake = random images for smoke runs)", choices=tuple(NUM_CLASSES))
    data_dir: str = arg("./data", "dataset root (holds cifar-100-python / cifar-10-batches-py)")
    download: bool = arg(True, "download CIFAR through torchvision if missing")
    train_subset: int = arg(0, "train on the first N / C images of each class only (a data-limited regime); 0 = all")
    # models
    distill: str = arg("ifacd", "none (train alone: teachers), kd, crd, ifacd or a RepDistiller baseline",
                       choices=METHODS)
    student: str = arg("wrn_16_2", "the model trained", choices=tuple(CIFAR_MODELS))
    teacher: str = arg("wrn_40_2", "the frozen teacher's architecture (unused with distill none)",
                       choices=tuple(CIFAR_MODELS))
    teacher_ckpt: str = arg("", "the teacher's weights: this script's last.pt or a bare state dict (RepDistiller's)")
    # loss
    alpha: float = arg(1.0, "weight of the cross-entropy (S000: 1)")
    beta: float = arg(1.0, "weight of KL(teacher || student) at kd_temperature (S000: 1; ignored with distill none)")
    gamma: float = arg(0.8, "weight of the method's term; not in S000: the configs use RepDistiller's (crd 0.8, hint "
                            "100, attention 1000, similarity 3000, correlation 0.02, vid 1, rkd 1, pkt 3e4, nst 50)")
    kd_temperature: float = arg(4.0, "KD softmax temperature T (Hinton; RepDistiller: 4)")
    nce_temperature: float = arg(0.07, "temperature of CRD's NCE and IFACD's contrastive loss (fork: nce_t 0.07)")
    feat_dim: int = arg(128, "CRD and CC embedding / IFACD projection width (RepDistiller and the fork: 128)")
    ifacd_layers: int = arg(2, "IFACD: teacher layers taken from the end of the last stage (slides: ifacd1/2/3)")
    crd_negatives: int = arg(16384, "CRD: other-class negatives per anchor (RepDistiller nce_k: 16384)")
    crd_momentum: float = arg(0.5, "CRD: memory-bank momentum (RepDistiller nce_m: 0.5)")
    crd_mode: str = arg("exact", "CRD's positive: exact = the image itself, relax = a random image of its class "
                                 "(RepDistiller --mode)", choices=("exact", "relax"))
    init_epochs: int = arg(30, "abound, factor, fsp: epochs of RepDistiller's init stage before the main loop "
                               "(RepDistiller: 30)")
    hint_layer: int = arg(2, "FitNet: the stage (0 = stem) whose output is regressed (RepDistiller hint_layer: 2)")
    sync_bn: bool = arg(False, "SyncBN across GPUs (the paper trains on one GPU); ignored on the CPU")
    # optimisation
    lr: float = arg(0.05, "learning rate at batch 64, scaled linearly with batch_size (S000/RepDistiller: 0.05)")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(True, "Nesterov momentum (the fork, via timm; RepDistiller: false)")
    weight_decay: float = arg(5e-4, "weight decay (S000: 5e-4)")
    exclude_bias_norm: bool = arg(True, "no weight decay on biases and BN parameters (the fork; RepDistiller: false)")
    lr_milestones: list = arg([150, 180, 210], "epochs after which the lr is multiplied by lr_decay (S000)")
    lr_decay: float = arg(0.1, "step-decay factor")
    epochs: int = arg(240, "training epochs (S000: 240)")
    batch_size: int = arg(64, "global batch size over all GPUs (S000/RepDistiller: 64)")
    amp: str = arg("none", "mixed precision on CUDA: none (the paper: fp32), bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the student and its distillation heads")
    # run
    output_dir: str = arg("./out/ifacd_distill", "where last.pt, log.jsonl and config.yaml go")
    seed: int = arg(0, "random seed (the table averages several)")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = the full epoch (tests use 2)")
    eval_every: int = arg(1, "test top-1 every this many epochs (and after the last); 0 = off")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags given on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ============================================ method: losses and heads ============================================

def kd_loss(student_logits, teacher_logits, temperature):
    """KD (Hinton et al. 2015): KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, mean over the batch
    (RepDistiller `DistillKL`). student_logits, teacher_logits: (B, C). Local to this rank's batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


def ifacd_loss(features, temperature):
    """IFACD's contrastive loss: SupCon 'all' without labels (Khosla et al. 2020, Eq. 2 L_out; the fork's SupConLoss
    with base_temperature = temperature), METHODS.md sections 1 and 8.

    features: (n, V, D) this rank's n images x V views (student's final feature, then the n_l teacher layers), any
    scale (L2-normalised here). Every one of the vectors is an anchor; its positives are the V - 1 other views of
    the same image, its denominator every other vector of the global batch (gathered from all ranks with gradient).
    Loss = -mean over anchors of the mean log-probability of its positives.
    """
    n, V, D = features.shape
    z = F.normalize(features, dim=2).reshape(n * V, D)  # (nV, D): row i*V + v = view v of image i
    z_all = dist.gather_with_grad(z)  # (W*nV, D): rank r's rows at [nV*r, nV*(r+1))
    offset = n * V * dist.rank()
    logits = z @ z_all.T / temperature  # (nV, W*nV)
    rows = torch.arange(n * V, device=z.device)
    cols = torch.arange(z_all.shape[0], device=z.device)
    self_mask = cols[None, :] == (rows + offset)[:, None]  # an anchor is not in its own denominator
    positive = (cols[None, :] // V == ((rows + offset) // V)[:, None]) & ~self_mask  # same image, other view
    log_prob = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (V - 1)).mean()


def crd_nce_loss(p, n_data, eps=1e-7):
    """CRD's NCE loss (Tian et al. 2020, Eq. 18; RepDistiller `ContrastLoss`). p: (B, 1 + K) scores
    exp(v . m / tau) / Z, column 0 the positive, columns 1..K the negatives; noise P_n = 1 / n_data."""
    m = (p.shape[1] - 1) / n_data  # K * P_n
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + m + eps))  # the positive comes from the data distribution
    log_d0 = torch.log(m / (p[:, 1:] + m + eps))  # the negatives come from the noise distribution
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


class CRDMemory(nn.Module):
    """CRD's two memory banks over the training images (student and teacher embeddings, RepDistiller
    `ContrastMemory`) and the normalisers Z, fixed at the first batch; all three are checkpointed (`loss_state`)."""

    def __init__(self, n_data, dim, momentum):
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)  # RepDistiller's init: U(-stdv, stdv)
        self.register_buffer("bank_s", torch.rand(n_data, dim) * 2 * stdv - stdv)
        self.register_buffer("bank_t", torch.rand(n_data, dim) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative = not fixed yet
        self.momentum = momentum

    @torch.no_grad()
    def fix_normalisers(self, e_s, e_t):
        """Z = mean score x n_data on the first batch (mean over all ranks, so every rank holds the same Z)."""
        if self.z[0] < 0:
            means = dist.all_reduce_sum(torch.stack([e_s.mean(), e_t.mean()])) / dist.world_size()
            self.z.copy_(means * self.bank_s.shape[0])
        return self.z

    @torch.no_grad()
    def update(self, v_s, v_t, idx):
        """m * bank[idx] + (1 - m) * v, re-normalised; called with the whole global batch so banks stay equal."""
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            bank[idx] = F.normalize(bank[idx] * self.momentum + v * (1 - self.momentum), dim=1)


def crd_loss(v_s, v_t, memory, sample, temperature):
    """CRD: v_s, v_t (B, D) L2-normalised embeddings; sample (B, 1 + K) dataset indices, column 0 the positive (the
    image itself, or an image of its class with --crd_mode relax), then the K negatives. Student anchors are scored
    against the teacher bank and teacher anchors against the student bank (Eq. 18, both ways)."""
    e_s = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_t[sample], v_s) / temperature)  # (B, 1+K)
    e_t = torch.exp(torch.einsum("bkd,bd->bk", memory.bank_s[sample], v_t) / temperature)
    z = memory.fix_normalisers(e_s, e_t)
    return crd_nce_loss(e_s / z[0], memory.bank_s.shape[0]) + crd_nce_loss(e_t / z[1], memory.bank_s.shape[0])


class CRDEmbed(nn.Module):
    """CRD's embeddings: Linear -> L2-norm on the pooled student and teacher features. forward -> (v_s, v_t)."""

    def __init__(self, s_dim, t_dim, feat_dim):
        super().__init__()
        self.embed_s, self.embed_t = nn.Linear(s_dim, feat_dim), nn.Linear(t_dim, feat_dim)

    def forward(self, s, t):
        return F.normalize(self.embed_s(s.pooled), dim=1), F.normalize(self.embed_t(t.pooled), dim=1)


class IFACDHead(nn.Module):
    """IFACD's contrastive head (fork 62a53e7, METHODS.md section 8): one rescaler Linear(c_l -> t_dim) + BN1d per
    teacher layer (the last one included), projectors Linear + BN1d to feat_dim: proj_s for the student, proj_t shared
    by the teacher layers. forward -> (B, 1 + n, feat_dim): the student's view first, then the teacher layers."""

    def __init__(self, s_dim, t_dim, layer_dims, feat_dim):
        super().__init__()
        self.rescalers = nn.ModuleList(nn.Sequential(nn.Linear(c, t_dim), nn.BatchNorm1d(t_dim)) for c in layer_dims)
        self.proj_s = nn.Sequential(nn.Linear(s_dim, feat_dim), nn.BatchNorm1d(feat_dim))
        self.proj_t = nn.Sequential(nn.Linear(t_dim, feat_dim), nn.BatchNorm1d(feat_dim))

    def forward(self, s, t):
        layers = t.last_stage[-len(self.rescalers):]  # the teacher's last n ReLU outputs, computed without grad
        views = [self.proj_s(s.pooled)] + [self.proj_t(rescale(F.adaptive_avg_pool2d(f, 1).flatten(1)))
                                           for rescale, f in zip(self.rescalers, layers)]
        return torch.stack(views, dim=1)  # (B, 1+n, feat_dim)


def build_heads(cfg, student, teacher, size=32):
    """The trainable distillation modules of cfg.distill, sized by a probe forward of both models at the training
    image size; None if none."""
    if cfg.distill in ("none", "kd", "abound", "fsp"):  # AB and FSP train nothing extra in the main loop
        return None
    s, t = feature_shapes(student, size), feature_shapes(teacher, size)
    if cfg.distill == "factor":  # FT's translator of the student's last stage (the paraphraser is loss state)
        return L.Translator(s.stages[-1], t.stages[-1])
    if cfg.distill in L.BASELINES:  # FitNet's regressor, CC's embeddings, VID's regressors; None for the others
        return L.build_head(cfg.distill, s, t, cfg.feat_dim, cfg.hint_layer)
    if cfg.distill == "crd":
        return CRDEmbed(s.pooled[1], t.pooled[1], cfg.feat_dim)
    if not 1 <= cfg.ifacd_layers <= len(t.last_stage):
        raise ConfigError(f"ifacd_layers={cfg.ifacd_layers}: {cfg.teacher} has {len(t.last_stage)} ReLU outputs in "
                          f"its last stage; choose 1..{len(t.last_stage)}")
    dims = [shape[1] for shape in t.last_stage[-cfg.ifacd_layers:]]
    return IFACDHead(s.pooled[1], t.pooled[1], dims, cfg.feat_dim)


def build_loss_state(cfg, student, teacher, n_data, size=32):
    """The method's modules outside DDP, checkpointed as `loss_state`: CRD's memory banks; AB's connectors and FT's
    paraphraser, which only the init stage trains (FT's then encodes the teacher's maps, frozen, in the main loop).
    An empty module for the other methods. Also refuses a pair FSP cannot compare."""
    if cfg.distill == "crd":
        return CRDMemory(n_data, cfg.feat_dim, cfg.crd_momentum)
    if cfg.distill not in TWO_STAGE:
        return nn.Module()
    s, t = feature_shapes(student, size), feature_shapes(teacher, size)
    if cfg.distill == "abound":  # student maps -> teacher channels, on the pre-activation stage outputs
        return L.Connector(s.preact[1:], t.preact[1:])
    if cfg.distill == "factor":
        return L.Paraphraser(t.stages[-1])
    L.check_fsp_shapes(s.stages, t.stages)  # fsp: no module of its own
    return nn.Module()


class Distiller(nn.Module):
    """The trainable part, wrapped in DDP as one module: the student and the heads. forward(x, t) -> (Features, z),
    z = the heads' output on (student features, teacher features), or None without heads."""

    def __init__(self, student, heads=None):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, x, t=None):
        s = self.student(x, features=True)
        return s, (self.heads(s, t) if self.heads is not None else None)


def distill_term(cfg, s, t, z, state, sample):
    """L_method, the loss the slides weight by gamma, in float32: 0 for none, kd (KD's term is the beta * KL term),
    abound and fsp (RepDistiller trains them in the init stage only). s, t: the student's and the teacher's
    Features; z: the heads' output (None without heads); state: build_loss_state's module; sample: CRD's indices."""
    if cfg.distill == "crd":
        return crd_loss(z[0].float(), z[1].float(), state, sample, cfg.nce_temperature)
    if cfg.distill == "factor":  # the frozen paraphraser's factor of the teacher's map (eval mode, no gradient)
        with torch.no_grad():
            factor_t = state.factor(t.stages[-1])
        return L.factor_loss(z.float(), factor_t.float())
    if cfg.distill == "ifacd":
        return ifacd_loss(z.float(), cfg.nce_temperature)
    if cfg.distill in L.BASELINES:  # distill_losses.baseline_loss: RepDistiller's features for each of them
        return L.baseline_loss(cfg.distill, s, t, z)
    return torch.zeros((), device=s.logits.device)


# ================================================== training ==================================================

def init_stage(cfg, model, state):
    """What RepDistiller's init stage trains (`train_student.py`, `helper/pretrain.py`) and its learning rate at
    batch 64: AB the connectors and the student's feature modules, FT the paraphraser, FSP the student's feature
    modules (`feat_modules()`: all but the classifier). lr 0.01 for FT with a resnet/wrn student (RepDistiller's list,
    ResNet50 not in it), else --lr; constant, no KD or CE."""
    feat = model.student.feat_modules()
    trained = {"abound": [state, feat], "factor": [state], "fsp": [feat]}[cfg.distill]
    lr = 0.01 if cfg.distill == "factor" and cfg.student.startswith(("resnet", "wrn")) else cfg.lr
    return nn.ModuleList(trained), lr


def init_loss(cfg, s, t, state):
    """The init stage's loss in float32. AB: the connectors' student maps vs the teacher's, pre-activation stage
    outputs (feat[1:-1]); FT: MSE of the paraphraser's reconstruction of the teacher's last stage (feat[-2]); FSP:
    the FSP matrices of every stage output (feat[:-1])."""
    if cfg.distill == "abound":
        return L.ab_loss([f.float() for f in state(s.preact[1:])], [f.float() for f in t.preact[1:]])
    if cfg.distill == "factor":
        return L.reconstruction_loss(state.reconstruct(t.stages[-1]).float(), t.stages[-1].float())
    return L.fsp_loss([f.float() for f in s.stages], [f.float() for f in t.stages])


def train_init_epoch(model, teacher, state, trained, loader, optimizer, scaler, cfg, ctx, epoch, lr):
    """One epoch of the init stage (epochs -init_epochs..-1). As RepDistiller: the student in eval mode except the
    modules trained (train mode), the teacher frozen. The student is called outside DDP, so the trained gradients are
    averaged over ranks by hand, and rank 0's BN statistics are copied to every rank at the end of the epoch (FT's
    paraphraser runs in eval mode afterwards, so every rank must hold the same ones)."""
    model.eval()
    trained.train()
    params = list(trained.parameters())
    meter, progress = log.Meter(), log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    for i, (x, *_) in enumerate(progress):
        x = x.to(ctx.device, non_blocking=True)
        with optim.autocast(cfg.amp, ctx.device):
            with torch.no_grad():
                t = teacher(x, features=True)
            s = model.student(x, features=True) if cfg.distill != "factor" else None  # FT reads the teacher only
        loss = init_loss(cfg, s, t, state)
        optim.step(loss, optimizer, scaler, average=params)
        meter.update(loss, i)
        progress.log(i, i, meter, lr=lr)
    meter.check("init-stage loss")
    dist.broadcast_buffers(model)
    dist.broadcast_buffers(state)
    return {"loss": meter.global_avg(), "lr": lr, **progress.stats()}


def train_one_epoch(model_ddp, teacher, state, loader, optimizer, scaler, cfg, ctx, epoch, step, peak_lr):
    model_ddp.train()  # the teacher is not part of model_ddp: it stays in eval mode
    state.eval()  # FT's paraphraser is frozen in the main loop (RepDistiller: module_list[2].eval())
    meters = {k: log.Meter() for k in ("loss", "ce", "kl", "distill")}
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    lr = schedules.step_decay(epoch, cfg.lr_milestones, peak_lr, cfg.lr_decay)  # x0.1 after epochs 150, 180, 210
    optim.set_lr_wd(optimizer, lr)
    zero = torch.zeros((), device=ctx.device)  # the KL term without a teacher
    for i, (x, y, idx, sample) in enumerate(progress):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        idx, sample = idx.to(ctx.device, non_blocking=True), sample.to(ctx.device, non_blocking=True)
        with optim.autocast(cfg.amp, ctx.device):
            with torch.no_grad():  # frozen teacher: its features carry no graph
                t = teacher(x, features=True) if teacher is not None else None
            s, z = model_ddp(x, t)
        # losses in float32 (bf16/fp16 softmax, exp and normalisation are not safe)
        ce = F.cross_entropy(s.logits.float(), y)
        kl = kd_loss(s.logits.float(), t.logits.float(), cfg.kd_temperature) if t is not None else zero
        term = distill_term(cfg, s, t, z, state, sample)
        loss = cfg.alpha * ce + cfg.beta * kl + cfg.gamma * term  # S000: alpha CE + beta KL + gamma L_method
        optim.step(loss, optimizer, scaler)
        if cfg.distill == "crd":  # CRD updates the banks after scoring, with every rank's samples
            state.update(dist.gather(z[0].detach().float()), dist.gather(z[1].detach().float()), dist.gather(idx))
        for name, value in (("loss", loss), ("ce", ce), ("kl", kl), ("distill", term)):
            meters[name].update(value, step)
        progress.log(i, step, meters["loss"], lr=lr)
        step += 1
    meters["loss"].check()
    return step, {**{k: m.global_avg() for k, m in meters.items()}, "lr": lr, **progress.stats()}


@torch.no_grad()
def evaluate(model, loader, ctx):
    """Top-1 (%) on the test set: every rank scores its shard (eval_loader: no padding), counts are summed."""
    model.eval()
    counts = torch.zeros(2, device=ctx.device)  # (correct, total)
    for x, y, _ in loader:
        pred = model(x.to(ctx.device, non_blocking=True)).argmax(dim=1)
        counts += torch.stack([(pred == y.to(ctx.device)).sum(), torch.tensor(len(y), device=ctx.device)])
    correct, total = dist.all_reduce_sum(counts).tolist()
    return 100.0 * correct / total


def param_counts(model, teacher, state, method):
    """(trainable: student + heads once, slides: teacher + student + heads as S000 counts them). S000's 'Number of
    Parameters' counts every module of RepDistiller's `module_list` plus `criterion_list`, so the heads registered
    in both (CRD's embeddings, IFACD's heads) count twice, the others (FitNet's regressor and CC's embeddings in
    module_list, VID's in criterion_list; AB's connectors and FT's translator and paraphraser in module_list) once
    (METHODS.md section 10); printed beside ours for comparison. `state`'s parameters (AB's connectors, FT's
    paraphraser) are trained in the init stage only; CRD's banks are buffers."""
    def count(module):
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    heads = count(model.heads)
    twice = 2 if method in HEADS_COUNTED_TWICE else 1
    return count(model.student) + heads, count(teacher) + count(model.student) + twice * heads + count(state)


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    if cfg.distill != "none" and not cfg.teacher_ckpt:
        raise ConfigError(f"--distill {cfg.distill} needs --teacher_ckpt (a {cfg.teacher} trained with --distill none)")
    if cfg.init_epochs < 0:
        raise ConfigError(f"init_epochs={cfg.init_epochs}: the init stage of abound, factor and fsp needs 0 or more")
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights and CRD banks on every rank

    # ----- data: RandomCrop(32, 4) + flip for training (28 px: pad 3), the plain normalised images for the test -----
    mean, std = MEAN_STD.get(cfg.dataset, MEAN_STD["cifar100"])
    size = data.DEFAULT_IMAGE_SIZE[cfg.dataset]
    train_base = data.build_dataset(cfg.dataset, cfg.data_dir, "train",
                                    augment.linear_train_transform(size, mean, std), cfg.download)
    train_base = data.balanced_subset(train_base, cfg.train_subset) if cfg.train_subset else train_base
    crd = cfg.distill == "crd"
    train_set = data.DistillSet(train_base, cfg.crd_negatives if crd else 0, cfg.crd_mode == "relax")
    test_set = data.build_dataset(cfg.dataset, cfg.data_dir, "val", augment.eval_transform(size, mean, std))
    loader = data.train_loader(train_set, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    test_loader = data.eval_loader(test_set, 256, ctx, cfg.num_workers)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)

    # ----- models: frozen teacher, student + distillation heads (one DDP module), the method's state outside DDP -----
    num_classes = NUM_CLASSES[cfg.dataset]
    channels_last = models.use_channels_last(cfg.student, ctx.device)  # NHWC convolutions (also on the CPU)
    teacher = (load_teacher(cfg.teacher_ckpt, cfg.teacher, num_classes, ctx.device, channels_last)
               if cfg.distill != "none" else None)
    student = build_cifar_model(cfg.student, num_classes)
    model, model_ddp, note = dist.prepare(Distiller(student, build_heads(cfg, student, teacher, size)), ctx,
                                          cfg.sync_bn, cfg.compile, channels_last)
    state = build_loss_state(cfg, student, teacher, len(train_set), size).to(ctx.device)
    params, params_slides = param_counts(model, teacher, state, cfg.distill)
    what = f"{cfg.distill}: {cfg.teacher} -> {cfg.student}" if teacher else f"{cfg.student} trained alone"
    print0(f"{note}; {what}; parameters: "
           f"{params / 1e6:.3f}M trainable (student + heads, counted once), {params_slides / 1e6:.2f}M as the slides "
           f"count them (teacher + student + heads, crd/ifacd heads twice); {len(train_set)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedule (the lr is set every epoch in train_one_epoch) -----
    peak_lr = cfg.lr * cfg.batch_size / 64  # 0.05 at batch 64 (the fork: 0.2 x B / 256); linear scaling otherwise
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer("sgd", groups, lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)
    # AB, FT, FSP: RepDistiller's init stage, numbered epochs -init_epochs..-1 (one loop, checkpoint and resume for
    # both stages), with its own optimizer: plain SGD at a constant lr
    first_epoch, init = 0, {}
    if cfg.distill in TWO_STAGE:
        first_epoch, (trained, init_lr) = -cfg.init_epochs, init_stage(cfg, model, state)
        init_lr *= cfg.batch_size / 64
        init = dict(init_optimizer=optim.build_optimizer(
            "sgd", optim.param_groups(trained, cfg.weight_decay, cfg.exclude_bias_norm), lr=init_lr,
            momentum=cfg.momentum, nesterov=cfg.nesterov))

    # ----- resume -----
    start_epoch, step, saved = checkpoint.resume(cfg, model=model, optimizer=optimizer, scaler=scaler,
                                                 loss_state=state, **init)
    start_epoch = start_epoch if saved else first_epoch
    best = saved.get("best_top1", 0.0)
    # the slides' 'Training Time' and 'Memory Requirements' cover the whole run: both carry over a resume
    train_time, peak_reserved = saved.get("train_time_s", 0.0), saved.get("peak_mem_reserved_gb", 0.0)

    # ----- epoch loop: (init stage,) train, evaluate, log, checkpoint -----
    top1 = None
    for epoch in range(start_epoch, cfg.epochs):
        start = time.perf_counter()
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        if epoch < 0:  # the init stage
            row = train_init_epoch(model, teacher, state, trained, loader, init["init_optimizer"], scaler, cfg, ctx,
                                   epoch, init_lr)
        else:
            step, row = train_one_epoch(model_ddp, teacher, state, loader, optimizer, scaler, cfg, ctx, epoch, step,
                                        peak_lr)
        if epoch >= 0 and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            top1 = evaluate(model.student, test_loader, ctx)
            best = max(best, top1)
            row.update(test_top1=top1, best_test_top1=best)  # the reported number is the last epoch's test_top1
        train_time += time.perf_counter() - start  # train + test, wall seconds
        row.update(params=params, params_slides=params_slides, train_time_s=train_time)  # + the epoch's peak memory
        if ctx.device.type == "cuda":  # the run's peak = the max over epochs (Progress resets CUDA's peak stats)
            peak_reserved = max(peak_reserved, torch.cuda.max_memory_reserved(ctx.device) / 2**30)
            row.update(peak_mem_reserved_gb=peak_reserved)
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg), cfg.save_every,
                              model=model, optimizer=optimizer, scaler=scaler, loss_state=state, **init,
                              best_top1=best, train_time_s=train_time, peak_mem_reserved_gb=peak_reserved)
    if top1 is not None:
        print0(f"test top-1 of the last epoch: {top1:.2f}% (best epoch, not the reported number: {best:.2f}%)")

    # ----- cleanup -----
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
