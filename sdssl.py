"""SDSSL: Self-Distilled Self-supervised Representation Learning (Jang et al., arXiv:2111.12958),
on MoCo v3, BYOL or SimCLR (`--framework`).

Every intermediate block l of the student gets its own projector (and predictor) too; its output q_l
learns the final target z_L of the other view, and the predictors also learn on detached
projections h_l (`sdssl_loss` gives each framework's L_ssl and targets):
    L = L_ssl(q_L, z_L) + alpha/(L-1) sum_{l<L} L_ssl(q_l, sg z_L)            (Eq. 3: L_isd)
        + beta sum_l L_ssl(pred_l(sg h_l), sg z_L)                            (Eq. 5: L_pred; Eq. 6)
Reproduces Tables 1 (ViT, SD and *_plain) and 7 (ResNet-50) in configs/sdssl/, each YAML header
giving its source; Tables 5-6 with `--alpha_schedule`, `--pred_loss`, `--isd_every`, `--isd_head`.
Deviations and choices (the detail is at the named flag, line or YAML header):
- the configs' ViT-S has the authors' 6 heads (evidence in each YAML header): `--num_heads`;
- some configs take alpha from the authors' code, not the paper: `--alpha_max`;
- teacher momentum from the authors' code, not MoCo v3: `--base_momentum`; bf16 autocast: `--amp`;
- which blocks MLP/n uses: `isd_layers`; the ResNet heads (the paper gives none): `build_heads`;
- not copied from the authors' code: its warmup peaks one step earlier (a linspace), and its SD-BYOL
  averages the loss over all 12 layers at step 0 only: `train_one_epoch` (a step's difference).

Run
    torchrun --standalone --nproc_per_node=8 sdssl.py --data_dir /data/imagenet  # SD-MoCo v3, S/16
    torchrun --standalone --nproc_per_node=8 sdssl.py --config configs/sdssl/byol_vit_b16.yaml \
        --data_dir DIR
    python sdssl.py --dataset fake --arch vit_debug --patch_size 8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                      # a smoke run on the CPU
"""
import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.config import ConfigError, arg
from common.log import print0
from eval.knn import KNNMonitor


@dataclass(frozen=True)
class Config:
    # method
    framework: str = arg("mocov3", "the SSL method SDSSL is applied to",
                         choices=("simclr", "byol", "mocov3"))
    alpha_max: float = arg(1.0, "final weight of L_isd (paper: 1.0; the authors' code: 0.8 for "
                                "BYOL and SimCLR)")
    alpha_schedule: str = arg("cosine", "alpha: cosine ramp 0 -> alpha_max per step (Sec. 4.1), or "
                                        "constant", choices=("cosine", "constant"))
    beta: float = arg(1.0, "weight of L_pred (Eq. 6: 1)")
    pred_loss: bool = arg(True, "L_pred: the predictors learn on detached projections (Eq. 5)")
    isd_every: int = arg(1, "intermediate heads on every n-th block only ('MLP/n'); 1 = all")
    isd_head: str = arg("mlp3", "intermediate projectors: mlp3, mlp2 or none ('w/o MLP')",
                        choices=("mlp3", "mlp2", "none"))
    temperature: float = arg(0.2, "tau of the contrastive losses (MoCo v3 / SDSSL: 0.2)")
    base_momentum: float = arg(0.996, "teacher EMA momentum at step 0, cosine-increased to 1 "
                                      "(authors' code: 0.996; MoCo v3's: 0.99)")
    # data
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and /val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (MoCo v3 / SDSSL: 0.08)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("vit_small", "backbone: a ViT, or resnet50 for Table 7",
                    choices=tuple(models.BACKBONES))
    patch_size: int = arg(16, "ViT patch size (Table 1: 32 and 16)")
    num_heads: int = arg(0, "ViT attention heads; 0 = the arch's (vit_small: 12, as MoCo v3)")
    freeze_patch_embed: bool = arg(True, "frozen random patch projection (MoCo v3, SDSSL Sec. 4.1)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init each block's last BN (MoCo v3 recipe)")
    proj_hidden_dim: int = arg(4096, "last block's projector hidden width (4096)")
    isd_hidden_dim: int = arg(2048, "intermediate projectors' hidden width (2048)")
    proj_dim: int = arg(256, "output dimension of every projector and predictor (256)")
    pred_hidden_dim: int = arg(4096, "predictors' hidden width (4096)")
    sync_bn: bool = arg(True, "SyncBN across GPUs; ignored on the CPU")
    # optimisation
    optimizer: str = arg("adamw", "adamw (paper), lars or sgd", choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.5e-4, "base learning rate per 256 images (paper: 1.5e-4 MoCo v3 and BYOL, "
                            "1.3e-4 SimCLR)")
    weight_decay: float = arg(0.1, "weight decay (paper: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay on biases and norms (authors' code)")
    warmup_epochs: int = arg(40, "linear warmup epochs before the cosine decay (paper: 40)")
    epochs: int = arg(300, "training epochs (paper: 300)")
    batch_size: int = arg(1024, "global batch size (paper: 1024 for S/16 and B/16, 4096 for S/32)")
    amp: str = arg("bf16", "mixed precision on CUDA: none (the authors' fp32), bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the student (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/sdssl", "where last.pt, log.jsonl, config.yaml and backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor every this many epochs (and after the last); 0 = off")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ======================= method: the student and its heads, teacher, losses =======================

class SDSSL(nn.Module):
    """Student: the backbone, the plain method's last-layer projector (and predictor), and one
    projector (and predictor) per block in `layers`: the intermediate heads.

    forward(views) -> per view (h, q, q_pred), each (K, n, proj_dim) for the K = len(layers) + 1
    used layers, the intermediate ones first: h the projections, q = pred(h) the predictions,
    q_pred = pred(sg h) for L_pred (Eq. 5). q and q_pred are None without predictors (SimCLR),
    q_pred without L_pred. With isd_head 'none' h is the last layer's only, (1, n, proj_dim)."""

    def __init__(self, cfg, backbone, layers):
        super().__init__()
        self.backbone, self.layers, self.pred_loss = backbone, layers, cfg.pred_loss
        self.raw_isd = cfg.isd_head == "none"
        # SimCLR: all views in one pass (BN over all their rows: simclr.py, the authors' SimCLR
        # path); MoCo v3, BYOL: one pass per view (BN statistics per view, as their code).
        self.joint = cfg.framework == "simclr"
        self.vit = models.is_vit(cfg.arch)
        self.projector, self.predictor, self.isd_projector, self.isd_predictor = \
            build_heads(cfg, backbone, layers)

    def forward(self, views):
        """views: [(n, 3, H, W)] -> per view (h, q, q_pred) (see the class docstring)."""
        passes = self.backbone_passes(views)  # per pass, [(rows, d_l)] per used layer
        h_last = self.last_projections(passes, len(views))  # per view (n, D)
        q_last, qp_last = self.last_predictions(h_last)  # per view (n, D) or None
        h_isd = self.isd_projections(passes)  # (K-1, v*n, D): the passes' rows one after another
        q_isd, qp_isd = self.isd_predictions(h_isd, groups=len(passes))  # the same, or None
        if self.raw_isd:  # isd_head 'none': h_isd is the CLS itself (embed_dim wide), no projection
            h_isd = None
        return [(view_layers(h_isd, h_last, i), view_layers(q_isd, q_last, i),
                 view_layers(qp_isd, qp_last, i)) for i in range(len(views))]

    def layer_features(self, x):
        """[(n, d_l)] for the intermediate layers, then the last: ViT CLS tokens through the shared
        final LayerNorm (only the CLS is normalised), or ResNet stages average-pooled (Sec. 4.6)."""
        if self.vit:
            _, tokens = self.backbone.forward_intermediates(x, norm=False)
            return [self.backbone.norm(tokens[l - 1][:, 0]) for l in self.layers + [len(tokens)]]
        stages = self.backbone.forward_stages(x)
        return [s.mean(dim=(2, 3)) for s in [stages[l - 1] for l in self.layers] + [stages[-1]]]

    def backbone_passes(self, views):
        """layer_features of each pass through the backbone: all views at once, or one by one."""
        if self.joint:
            return [self.layer_features(torch.cat(views))]
        return [self.layer_features(x) for x in views]

    def last_projections(self, passes, num_views):
        """h_L per view (n, D); the projector runs once per pass (its BN sees the pass's rows)."""
        h = [self.projector(p[-1]) for p in passes]
        return list(h[0].chunk(num_views)) if self.joint else h

    def last_predictions(self, h_last):
        """pred(h_L) and, for L_pred, pred(sg h_L), per view (n, D); None without them."""
        none = [None] * len(h_last)
        if self.predictor is None:
            return none, none
        q = [self.predictor(h) for h in h_last]
        return q, ([self.predictor(h.detach()) for h in h_last] if self.pred_loss else none)

    def isd_projections(self, passes):
        """h_l of the intermediate layers, (K-1, v*n, D), each pass's rows normalised by their own
        BN statistics as in a separate pass; None without intermediate layers."""
        if not self.layers:
            return None
        if isinstance(self.isd_projector, models.BatchedMLP):  # a ViT: all layers in one MLP
            feats = [torch.cat(f) for f in zip(*(p[:-1] for p in passes))]  # per layer (v*n, d)
            return self.isd_projector(torch.stack(feats), groups=len(passes))
        # one head per layer, pass by pass (ResNet stages differ in width; 'none': identities)
        return torch.stack([torch.cat([head(p[j]) for p in passes])
                            for j, head in enumerate(self.isd_projector)])

    def isd_predictions(self, h_isd, groups):
        """pred_l(h_l) and, for L_pred, pred_l(sg h_l), each (K-1, v*n, D) or None, from one pass of
        the batched predictors (the detached copies are BN groups of their own)."""
        if self.isd_predictor is None:
            return None, None
        if not self.pred_loss:
            return self.isd_predictor(h_isd, groups=groups), None
        both = torch.cat([h_isd, h_isd.detach()], dim=1)  # (K-1, 2*v*n, D)
        return self.isd_predictor(both, groups=2 * groups).chunk(2, dim=1)


def view_layers(isd, last, i):
    """View i's output (K, n, D): its rows of the intermediate layers' `isd` (K-1, v*n, D), then
    the last layer's last[i] (n, D); None where the view has no such output."""
    if last[i] is None:
        return None
    n = last[i].shape[0]
    return last[i][None] if isd is None else torch.cat([isd[:, i * n:(i + 1) * n], last[i][None]])


def isd_layers(cfg, depth):
    """The blocks (1-based, below the last) with intermediate heads: n, 2n, ... < depth for
    --isd_every n (the paper does not say which blocks MLP/n uses)."""
    if cfg.alpha_max == 0 and not cfg.pred_loss:
        return []  # the plain method: no intermediate heads at all
    return list(range(cfg.isd_every, depth, cfg.isd_every))


def backbone_depth(cfg, backbone):
    """The layers: a ViT's blocks, or a ResNet's 4 stages."""
    return backbone.depth if models.is_vit(cfg.arch) else 4


def build_heads(cfg, backbone, layers):
    """The plain method's heads, MoCo v3's _build_mlp (projector: ViT 3 layers, ResNet 2; predictor
    2; BN on every output but BYOL's and the ResNet predictor's), and the intermediate ones."""
    vit, last_norm, d = models.is_vit(cfg.arch), cfg.framework != "byol", backbone.embed_dim
    projector = models.mlp(d, cfg.proj_hidden_dim, cfg.proj_dim, 3 if vit else 2,
                           last_norm=last_norm)
    has_pred = cfg.framework != "simclr"  # SimCLR has no predictor, hence no L_pred
    predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2,
                           last_norm=last_norm and vit) if has_pred else None
    isd_proj = isd_pred = None
    if layers:
        num_isd, isd_in = len(layers), cfg.proj_dim
        if cfg.isd_head == "none":  # Table 6 "w/o MLP": the predictors read the CLS token itself
            if not has_pred or not vit:
                raise ConfigError("--isd_head none needs a ViT and a predictor (byol or mocov3)")
            isd_proj, isd_in = nn.ModuleList([nn.Identity()] * num_isd), d
        elif vit:
            isd_proj = models.BatchedMLP(num_isd, d, cfg.isd_hidden_dim, cfg.proj_dim,
                                         3 if cfg.isd_head == "mlp3" else 2, last_norm)
        else:  # ResNet (S001 gives no sizes): 2-layer projectors, as MoCo v3's ResNet ones
            widths = [d // 2 ** (4 - l) for l in layers]  # stage l's (ResNet-50: 256, 512, 1024)
            isd_proj = nn.ModuleList([models.mlp(w, cfg.isd_hidden_dim, cfg.proj_dim, 2,
                                                 last_norm=last_norm) for w in widths])
        if has_pred:
            isd_pred = models.BatchedMLP(num_isd, isd_in, cfg.pred_hidden_dim, cfg.proj_dim, 2,
                                         last_norm and vit)
    return projector, predictor, isd_proj, isd_pred


def view_recipes(cfg, size):
    """MoCo v3's asymmetric pair (Sec. 4.1: "follow MoCo v3"): view 1 always blurred, view 2
    sometimes solarised."""
    return augment.byol_recipes(size, crop_min=cfg.crop_min)


def build_student(cfg, size):
    """The backbone with the plain method's heads and the self-distillation heads of isd_layers."""
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size,
                                  num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    return SDSSL(cfg, backbone, isd_layers(cfg, backbone_depth(cfg, backbone)))


class Teacher(nn.Module):
    """BYOL / MoCo v3 teacher: EMA copies of the backbone and of the last projector only
    (Sec. 4.1). x -> z_L."""

    def __init__(self, student):
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.projector = copy.deepcopy(student.projector)
        self.requires_grad_(False)

    def forward(self, x):
        return self.projector(self.backbone(x))


@torch.no_grad()
def ema_update(teacher, student, m):
    """xi <- m xi + (1 - m) theta for the teacher's backbone and projector (matched by name)."""
    online = dict(student.named_parameters())
    names, xi = zip(*teacher.named_parameters())
    optim.ema_(list(xi), [online[name] for name in names], m)


def contrastive_loss(q, k, temperature, num_layers=1):
    """The paper's ctr (Alg. 1, MoCo v3's InfoNCE): q (num_layers * n, D) rows layer by layer, k
    (n, D) this rank's keys (detached, gathered from every rank). Row j of layer l has its positive
    at column j + rank * n of the (num_layers * n, W * n) logits (labels repeated per layer). Mean
    cross-entropy x 2 tau, so with num_layers > 1 it is the mean over layers of the per-layer
    losses (Eq. 3's 1/(L-1) sum)."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = q @ dist.gather(k).T / temperature  # (num_layers * n, W * n)
    n = k.shape[0]
    labels = (torch.arange(n, device=q.device) + dist.rank() * n).repeat(num_layers)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def regression_loss(p, z, num_layers=1):
    """BYOL's L_ssl (Eq. 1): mean over rows of 2 - 2 cos(p, sg z). p (num_layers * n, D); z (n, D),
    repeated per layer."""
    p, z = F.normalize(p, dim=1), F.normalize(z.detach(), dim=1)
    return (2 - 2 * (p * z.repeat(num_layers, 1)).sum(dim=1)).mean()


def nt_xent_loss(q, z, temperature, num_layers=1):
    """SimCLR's NT-Xent (Eq. 2) with the final-layer outputs of both views as the candidates.

    z (2n, D): this rank's final projections [view 1; view 2], gathered from every rank (with
    gradient when z has one: the plain loss, q = z; without for L_isd, z detached). q
    (num_layers * 2n, D): anchors, layer by layer, each laid out as z. Anchor (view v, image i) has
    its positive at the other view's z of image i; its own view's z of image i is masked (for q = z
    that is the anchor itself). Mean cross-entropy over all anchors, no 2 tau factor."""
    q = F.normalize(q, dim=1)
    z_all = F.normalize(dist.gather_with_grad(z) if z.requires_grad else dist.gather(z), dim=1)
    n2, offset = z.shape[0], z.shape[0] * dist.rank()  # z_all: (W * 2n, D)
    own = (torch.arange(n2, device=q.device) + offset).repeat(num_layers)  # same view and image
    positive = ((torch.arange(n2, device=q.device) + n2 // 2) % n2 + offset).repeat(num_layers)
    logits = (q @ z_all.T / temperature).scatter(1, own[:, None], float("-inf"))  # (., W * 2n)
    return F.cross_entropy(logits, positive)


def sdssl_loss(cfg, student_out, teacher_out, alpha):
    """Eq. 6 / Alg. 1 for the framework; returns (total, {term: value}). student_out: per view
    (h, q, q_pred), each (K, n, D); teacher_out: per view z_L (n, D), None for SimCLR."""
    (h1, q1, qp1), (h2, q2, qp2) = student_out
    num_layers = (h1 if q1 is None else q1).shape[0]  # K: the intermediate layers and the last
    terms = {}
    if cfg.framework == "simclr":  # no teacher: the targets are the student's own final outputs
        h_last = torch.cat([h1[-1], h2[-1]])  # (2n, D): the final projections of both views
        terms["ssl"] = nt_xent_loss(h_last, h_last, cfg.temperature)
        if num_layers > 1:  # each intermediate output of view v against the detached final outputs
            h_isd = torch.cat([h1[:-1], h2[:-1]], dim=1).flatten(0, 1)  # ((K-1) * 2n, D)
            terms["isd"] = nt_xent_loss(h_isd, h_last.detach(), cfg.temperature, num_layers - 1)
    else:
        ssl = (functools.partial(contrastive_loss, temperature=cfg.temperature)
               if cfg.framework == "mocov3" else regression_loss)  # ssl(q, z, num_layers=1)
        z1, z2 = teacher_out
        terms["ssl"] = ssl(q1[-1], z2) + ssl(q2[-1], z1)  # each view against the other's z_L
        if num_layers > 1:
            terms["isd"] = (ssl(q1[:-1].flatten(0, 1), z2, num_layers=num_layers - 1)
                            + ssl(q2[:-1].flatten(0, 1), z1, num_layers=num_layers - 1))
        if qp1 is not None:  # Eq. 5: a sum over the K layers = K x the mean (Alg. 1: L * loss_pred)
            terms["pred"] = num_layers * (ssl(qp1.flatten(0, 1), z2, num_layers=num_layers)
                                          + ssl(qp2.flatten(0, 1), z1, num_layers=num_layers))
    total = terms["ssl"] + alpha * terms.get("isd", 0.0) + cfg.beta * terms.get("pred", 0.0)
    return total, terms


# ============================================ training ============================================

def train_one_epoch(model_ddp, views, model, teacher, loader, optimizer, scaler, cfg, ctx, epoch,
                    step, total_steps):
    model_ddp.train()
    if teacher is not None:
        teacher.train()  # BN on batch statistics, as the student
    meters = {name: log.Meter() for name in ("loss", "ssl", "isd", "pred", "out_std")}
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (MoCo v3)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        alpha = (cfg.alpha_max if cfg.alpha_schedule == "constant"
                 else schedules.ramp_up(step, total_steps, cfg.alpha_max))
        x1, x2 = views(images)  # (n, 3, H, W) each, on the device
        with optim.autocast(cfg.amp, ctx.device):
            student_out = model_ddp([x1, x2])  # per view (h, q, q_pred), each (K, n, D)
            with torch.no_grad():
                teacher_out = (teacher(x1), teacher(x2)) if teacher is not None else None  # z_L
        # the losses in fp32
        student_out = [tuple(t.float() if t is not None else None for t in o) for o in student_out]
        teacher_out = tuple(z.float() for z in teacher_out) if teacher_out else None
        loss, terms = sdssl_loss(cfg, student_out, teacher_out, alpha)
        optim.step(loss, optimizer, scaler)
        if teacher is not None:  # right after the student's update (authors' code; BYOL Sec. 3.1)
            momentum = schedules.ema_momentum(step, total_steps, cfg.base_momentum)
            ema_update(teacher, model, momentum)
        final = teacher_out[0] if teacher_out else student_out[0][0][-1]  # view 1's z_L (or h_L)
        logged = [("loss", loss), ("out_std", log.output_std(final))] + list(terms.items())
        for name, value in logged:
            meters[name].update(value, step)
        progress.log(i, step, meters["loss"], lr=lr, alpha=alpha)
        step += 1
    meters["loss"].check()
    row = {name: meter.global_avg() for name, meter in meters.items() if meter.count}
    row.update(log.output_spectrum(final), lr=lr, alpha=alpha)
    if teacher is not None:
        row["momentum"] = momentum
    return step, {**row, **progress.stats()}


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data -----
    size = data.image_size(cfg)
    channels_last = models.use_channels_last(cfg.arch, ctx.device)
    views = augment.ViewMaker(view_recipes(cfg, size), 2, ctx.device, cfg.aug_device, cfg.dataset,
                              cfg.compile, channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform,
                                 cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model: the student (DDP) and, but for SimCLR, its EMA teacher -----
    model, model_ddp, note = dist.prepare(build_student(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    teacher = Teacher(model) if cfg.framework != "simclr" else None  # after DDP's broadcast
    backbone_params = models.count_params(model.backbone)
    head_params = models.count_params(model) - backbone_params
    print0(f"{note}; SD-{cfg.framework}, self-distillation on blocks {model.layers} of "
           f"{backbone_depth(cfg, model.backbone)}; backbone {backbone_params / 1e6:.2f}M params, "
           f"heads {head_params / 1e6:.2f}M; {len(dataset)} images, {steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr set every step; wd constant) -----
    param_groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, param_groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)
    states = dict(model=model, optimizer=optimizer, scaler=scaler,
                  **({"teacher": teacher} if teacher else {}))
    # The state the paper evaluates: the EMA teacher of SD-MoCo v3 and SD-BYOL (the authors' k-NN
    # monitor, multi_exit.py, linear_moco.py, uni_ali.py), the student of SD-SimCLR. The k-NN
    # monitor reads it, and last.pt names it for `--which auto` in eval/*.
    evaluated = "teacher" if teacher else "model"

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, **states)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, model, teacher, loader, optimizer, scaler,
                                    cfg, ctx, epoch, step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            if teacher is not None:  # outside DDP: evaluate with rank 0's BN statistics
                dist.broadcast_buffers(teacher)
            row.update(knn.log_row(states[evaluated].backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every, evaluate=evaluated, **states)

    # ----- cleanup -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, teacher and teacher.backbone,
                               evaluated)
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
