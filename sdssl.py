"""SDSSL: Self-Distilled Self-Supervised Representation Learning (Jang et al., arXiv:2111.12958), on SimCLR, BYOL and
MoCo v3 with a ViT.

The plain method trains the last layer's CLS token (through the shared final LayerNorm, a projector and, for BYOL and
MoCo v3, a predictor) to match the teacher's projection z_L of another view. SDSSL gives every intermediate block l
its own projector (and predictor), and asks its output q_l to match the same sg(z_L) (intermediate self-distillation,
Eq. 3), with a weight alpha ramped up by a per-step cosine, plus a loss that trains only the predictors on detached
projections (Eq. 5):
    L = L_ssl(q_L, z_L) + alpha * 1/(L-1) sum_{l<L} L_ssl(q_l, sg z_L) + beta * sum_l L_ssl(pred_l(sg h_l), sg z_L)
(Eq. 6 and Alg. 1; no L_pred for SimCLR, whose "teacher" is the student itself, detached for L_isd). L_ssl is the
2 tau-scaled InfoNCE of MoCo v3 (`contrastive_loss`, the paper's `ctr`), BYOL's 2 - 2 cos (`regression_loss`) or
SimCLR's NT-Xent (`nt_xent_loss`). The intermediate heads are evaluated as one batched MLP (stacked weights, one bmm
per layer), so the per-layer heads cost a few per cent of a step, not a Python loop over 11 heads.

Reproduces S001 Table 1 (ImageNet, 300 epochs; configs/sdssl/{mocov3,byol,simclr}_vit_{s32,s16,b16}.yaml and the plain
baselines *_plain.yaml = alpha_max 0, no L_pred, no intermediate heads): ViT-S/32, ViT-S/16, ViT-B/16 (the authors' ViT:
6 heads for ViT-S), frozen random patch projection, fixed sin-cos position embedding, projectors 3-layer (hidden 4096
for the last block, 2048 for the others, out 256), predictors 2-layer (hidden 4096), BN on every output except BYOL's,
AdamW base lr 1.5e-4 (SimCLR 1.3e-4) x B/256, wd 0.1 (biases and norms excluded), 40 warmup epochs, batch 4096 (S/32)
or 1024, tau 0.2, teacher EMA 0.996 -> 1 (cosine per step). Ablations (Tables 5-6): --alpha_schedule constant,
--pred_loss false, --isd_every n (MLP/n), --isd_head {mlp3,mlp2,none}. ResNet-50 (Sec. 4.6, Table 7): each stage's
average-pooled output gets its own heads (`--arch resnet50`, configs/sdssl/mocov3_resnet50.yaml).
Known deviations and choices
- The configs use the authors' 6-head ViT-S (the paper cites DeiT for it, and their DINO-derived ViT has 6 heads in
  every version before Nov 2022, after Table 1; each config header gives the evidence); the flag default (0) is the
  arch's, 12 heads as MoCo v3's ViT-S.
- alpha_max defaults to 1.0 (the paper, Sec. 4.1); the authors' configs use 0.8 for SD-BYOL and SD-SimCLR, which our
  byol/simclr configs follow.
- Teacher momentum 0.996 -> 1 as the authors' code (MoCo v3's own default is 0.99).
- --isd_every n puts heads on blocks n, 2n, ... < L (the paper does not say which blocks MLP/n uses).
- ResNet variant: heads on stages 1-3 (the 4th is the final output), 2-layer projectors and predictors and
  zero-initialised residual BNs as MoCo v3's ResNet recipe (S001 gives no head sizes or init for it); the
  intermediate ResNet heads run in a loop (different widths).
- What the paper evaluates: the EMA teacher of SD-MoCo v3 and SD-BYOL (the authors' k-NN monitor, multi_exit.py,
  linear_moco.py, uni_ali.py), the student of SD-SimCLR; last.pt names it for the eval tools' `--which auto`.
- bf16 autocast on CUDA by default (the authors trained in fp32: --amp none); the k-NN monitor uses the teacher
  backbone (the student's for SimCLR).

Run
    torchrun --standalone --nproc_per_node=8 sdssl.py --arch vit_small --data_dir /data/imagenet      # SD-MoCo v3, S/16
    torchrun --standalone --nproc_per_node=8 sdssl.py --config configs/sdssl/byol_vit_b16.yaml --data_dir DIR
    python sdssl.py --dataset fake --arch vit_debug --patch_size 8 --batch_size 8 --epochs 1 --max_steps_per_epoch 2 \
        --device cpu --proj_hidden_dim 64 --isd_hidden_dim 32 --pred_hidden_dim 64 --proj_dim 32
"""
import copy
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
    framework: str = arg("mocov3", "the SSL method SDSSL is applied to", choices=("simclr", "byol", "mocov3"))
    alpha_max: float = arg(1.0, "final weight of L_isd (paper: 1.0; the authors' code: 0.8 for BYOL and SimCLR)")
    alpha_schedule: str = arg("cosine", "alpha: cosine ramp 0 -> alpha_max per step, or constant (Table 5)",
                              choices=("cosine", "constant"))
    beta: float = arg(1.0, "weight of L_pred (Eq. 6: 1)")
    pred_loss: bool = arg(True, "L_pred: train the predictors on detached projections (Eq. 5; Table 5 ablation)")
    isd_every: int = arg(1, "intermediate heads on blocks n, 2n, ... (Table 6 'MLP/n'); 1 = every block")
    isd_head: str = arg("mlp3", "intermediate projectors: mlp3, mlp2 or none (the CLS itself, Table 6)",
                        choices=("mlp3", "mlp2", "none"))
    temperature: float = arg(0.2, "tau of the contrastive losses (MoCo v3 / SDSSL: 0.2)")
    base_momentum: float = arg(0.996, "teacher EMA momentum at step 0, cosine-increased to 1 (authors' code: 0.996)")
    # data
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and data_dir/val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (MoCo v3 / SDSSL: 0.08)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader workers), gpu (batched on the "
                                  "training device; in-memory datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("vit_small", "backbone: a ViT, or resnet50 for Table 7", choices=tuple(models.BACKBONES))
    patch_size: int = arg(16, "ViT patch size (Table 1: 32 and 16)")
    num_heads: int = arg(0, "ViT attention heads; 0 = the arch's default (ViT-S: 12 as MoCo v3; the authors' ViT-S: 6)")
    freeze_patch_embed: bool = arg(True, "frozen random patch projection (MoCo v3 Sec. 4.2; SDSSL Sec. 4.1)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (MoCo v3's ResNet recipe)")
    proj_hidden_dim: int = arg(4096, "last block's projector hidden width (4096)")
    isd_hidden_dim: int = arg(2048, "intermediate projectors' hidden width (2048)")
    proj_dim: int = arg(256, "output dimension of every projector and predictor (256)")
    pred_hidden_dim: int = arg(4096, "predictors' hidden width (4096)")
    sync_bn: bool = arg(True, "SyncBN across GPUs; ignored on the CPU")
    # optimisation
    optimizer: str = arg("adamw", "adamw (paper), lars or sgd", choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.5e-4, "base learning rate per 256 images (paper: 1.5e-4 MoCo v3 and BYOL, 1.3e-4 SimCLR)")
    weight_decay: float = arg(0.1, "weight decay (paper: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay for biases and norm parameters (authors' code)")
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
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = the full epoch (tests use 2)")
    eval_every: int = arg(10, "k-NN monitor (teacher backbone) every this many epochs (and after the last); 0 = off")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours, evenly spaced (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags given on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# =============================== method: per-layer heads, student, teacher, losses ===============================

class BatchedMLP(nn.Module):
    """`heads` MLPs of the same shape evaluated together: x (heads, rows, in) -> (heads, rows, out), one bmm per
    layer. Each head is models.mlp's layout without biases (MoCo v3's _build_mlp): Linear -> BN -> ReLU, ...,
    Linear (-> affine-free BN if last_norm). The rows are `groups` equal blocks (the two views, and their detached
    copies for L_pred) that share the weights, so each weight is read once per step instead of once per block,
    but get their own BN statistics, exactly as separate passes would. BN runs on (n, heads * dim), i.e. per head
    and feature over a block's n rows, so it is the separate heads' BN and SyncBN conversion still applies."""

    def __init__(self, heads, in_dim, hidden_dim, out_dim, num_layers, last_norm=True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        # nn.Linear's default init per head: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(heads, a, b).uniform_(-a ** -0.5, a ** -0.5))
                                         for a, b in zip(dims[:-1], dims[1:])])
        self.norms = nn.ModuleList([nn.BatchNorm1d(heads * d) for d in dims[1:-1]])
        if last_norm:
            self.norms.append(nn.BatchNorm1d(heads * out_dim, affine=False))

    def forward(self, x, groups=1):
        for i, w in enumerate(self.weights):
            x = torch.bmm(x, w)  # (heads, rows, d_out): all groups at once
            if i < len(self.norms):
                h, rows, d = x.shape
                n = rows // groups
                x = torch.cat([self.norms[i](x[:, g * n:(g + 1) * n].transpose(0, 1).reshape(n, h * d))
                               .view(n, h, d).transpose(0, 1) for g in range(groups)], dim=1)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x


def isd_layers(cfg, depth):
    """Blocks (1-based) below the last that get self-distillation heads: n, 2n, ... < depth (every block for n = 1)."""
    if cfg.alpha_max == 0 and not cfg.pred_loss:
        return []  # the plain method: no intermediate heads at all
    return list(range(cfg.isd_every, depth, cfg.isd_every))


class SDSSL(nn.Module):
    """Student: backbone, the plain method's last-layer projector (and predictor) and the intermediate heads.

    forward(views) -> per view (h, q, q_pred), each (K, n, proj_dim) for the K = len(layers) + 1 used layers (the
    intermediate ones, then the last): h projections, q = pred(h) predictions, q_pred = pred(sg h) for L_pred (Eq. 5).
    q and q_pred are None without predictors (SimCLR); q_pred is None without L_pred. With isd_head 'none' the
    intermediate layers have no projector (their predictors read the CLS, width embed_dim), so h is the last
    layer's projection only, (1, n, proj_dim): no loss reads h there (it is refused for SimCLR)."""

    def __init__(self, cfg, backbone, layers):
        super().__init__()
        self.backbone, self.layers, self.pred_loss = backbone, layers, cfg.pred_loss
        self.raw_isd = cfg.isd_head == "none"
        self.joint = cfg.framework == "simclr"  # one forward pass over all views (BN over 2n), as simclr.py
        self.vit = models.is_vit(cfg.arch)
        self.projector, self.predictor, self.isd_projector, self.isd_predictor = build_heads(cfg, backbone, layers)

    def layer_features(self, x):
        """[(n, d_l)] for the intermediate layers, then the last: ViT CLS tokens through the shared final LayerNorm
        (only the CLS is normalised), or ResNet stages average-pooled (Sec. 4.6)."""
        if self.vit:
            _, tokens = self.backbone.forward_intermediates(x, norm=False)
            return [self.backbone.norm(tokens[l - 1][:, 0]) for l in self.layers + [len(tokens)]]
        stages = self.backbone.forward_stages(x)
        return [s.mean(dim=(2, 3)) for s in [stages[l - 1] for l in self.layers] + [stages[-1]]]

    def forward(self, views):
        """views: [(n, 3, H, W)] -> per view (h, q, q_pred). MoCo v3 / BYOL: the backbone and the last layer's heads
        see one view at a time (BN statistics per view, as their code); SimCLR: the views go through as one batch,
        BN over all of them (simclr.py, the authors' SimCLR path). The batched intermediate heads take every view
        (and, for L_pred, the detached copies) in one pass, with the same BN grouping."""
        v, n, pred = len(views), views[0].shape[0], self.predictor is not None
        if self.joint:  # per layer (v*n, d_l): the views' rows one after the other
            feats = self.layer_features(torch.cat(views))
            h_last = list(self.projector(feats[-1]).chunk(v))  # per view (n, D), BN over v*n rows
        else:
            per_view = [self.layer_features(x) for x in views]  # per view: [(n, d_l)] intermediate layers, the last
            feats = [torch.cat(f) for f in zip(*per_view)]  # per layer (v*n, d_l)
            h_last = [self.projector(f[-1]) for f in per_view]  # per view (n, D)
        groups = 1 if self.joint else v  # BN groups of rows in the intermediate heads
        q_last = [self.predictor(h) if pred else None for h in h_last]
        qp_last = [self.predictor(h.detach()) if pred and self.pred_loss else None for h in h_last]
        h_isd = q_isd = qp_isd = None
        if self.layers and isinstance(self.isd_projector, BatchedMLP):
            h_isd = self.isd_projector(torch.stack(feats[:-1]), groups=groups)  # (K-1, v*n, D)
        elif self.layers:  # one head per layer (ResNet stages differ in width; 'none' = the CLS), group by group
            h_isd = torch.stack([torch.cat([head(f) for f in feats[j].chunk(groups)])
                                 for j, head in enumerate(self.isd_projector)])
        if self.layers and pred:  # one pass of the predictors over h and, for L_pred, sg h: (K-1, 2*v*n, D)
            inputs = torch.cat([h_isd, h_isd.detach()], dim=1) if self.pred_loss else h_isd
            q = self.isd_predictor(inputs, groups=2 * groups if self.pred_loss else groups)
            q_isd, qp_isd = q.chunk(2, dim=1) if self.pred_loss else (q, None)

        def view_rows(isd, last, i):  # view i's (K-1, n, D) block and its last layer (n, D) -> (K, n, D)
            if last is None:
                return None
            return last[None] if isd is None else torch.cat([isd[:, i * n:(i + 1) * n], last[None]])
        h_rows = None if self.raw_isd else h_isd  # 'none': the raw CLS rows (embed_dim wide) are not projections
        return [(view_rows(h_rows, h_last[i], i), view_rows(q_isd, q_last[i], i), view_rows(qp_isd, qp_last[i], i))
                for i in range(v)]


def build_heads(cfg, backbone, layers):
    """The plain method's heads (MoCo v3's _build_mlp: ViT projector 3 layers, ResNet 2; BN on every output except
    BYOL's) and the intermediate ones (hidden isd_hidden_dim; predictors like the last one)."""
    vit, last_norm, d = models.is_vit(cfg.arch), cfg.framework != "byol", backbone.embed_dim
    projector = models.mlp(d, cfg.proj_hidden_dim, cfg.proj_dim, 3 if vit else 2, last_norm=last_norm)
    has_pred = cfg.framework != "simclr"
    predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_norm=last_norm and vit) \
        if has_pred else None
    isd_proj = isd_pred = None
    if layers:
        k, isd_in = len(layers), cfg.proj_dim
        if cfg.isd_head == "none":  # Table 6 "w/o MLP": the predictor reads the CLS token itself
            if not has_pred or not vit:
                raise ConfigError("--isd_head none needs a ViT and a predictor (byol or mocov3)")
            isd_proj, isd_in = nn.ModuleList([nn.Identity()] * k), d
        elif vit:
            isd_proj = BatchedMLP(k, d, cfg.isd_hidden_dim, cfg.proj_dim, 3 if cfg.isd_head == "mlp3" else 2, last_norm)
        else:
            widths = [d // 2 ** (4 - l) for l in layers]  # stage l's width (ResNet-50: 256, 512, 1024; final 2048)
            isd_proj = nn.ModuleList([models.mlp(w, cfg.isd_hidden_dim, cfg.proj_dim, 2, last_norm=last_norm)
                                      for w in widths])
        if has_pred:
            isd_pred = BatchedMLP(k, isd_in, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_norm and vit)
    return projector, predictor, isd_proj, isd_pred


def view_recipes(cfg, size):
    """MoCo v3's asymmetric pair (Sec. 4.1: "follow MoCo v3"): view 1 always blurred, view 2 sometimes solarised."""
    return augment.byol_recipes(size, crop_min=cfg.crop_min)


def build_student(cfg, size):
    """The backbone with the plain method's heads and the self-distillation heads of isd_layers."""
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size, num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    return SDSSL(cfg, backbone, isd_layers(cfg, backbone.depth if models.is_vit(cfg.arch) else 4))


class Teacher(nn.Module):
    """BYOL / MoCo v3 teacher: EMA copies of the backbone and of the last projector only (Sec. 4.1). x -> z_L."""

    def __init__(self, student):
        super().__init__()
        self.backbone, self.projector = copy.deepcopy(student.backbone), copy.deepcopy(student.projector)
        self.requires_grad_(False)

    def forward(self, x):
        return self.projector(self.backbone(x))


@torch.no_grad()
def ema_update(teacher, student, m):
    """xi <- m xi + (1 - m) theta for the teacher's backbone and projector (matched by name)."""
    online = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.mul_(m).add_(online[name].detach(), alpha=1.0 - m)


def contrastive_loss(q, k, temperature, num_layers=1):
    """The paper's ctr (Alg. 1, MoCo v3's InfoNCE): q (num_layers * n, D) rows layer by layer, k (n, D) this rank's
    keys (detached, gathered from every rank). Row j of layer l has its positive at column j + rank * n of the
    (num_layers * n, W * n) logits (labels repeated per layer). Mean cross-entropy x 2 tau, so with num_layers > 1 it
    is the mean over layers of the per-layer losses (Eq. 3's 1/(L-1) sum)."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = q @ dist.gather(k).T / temperature  # (num_layers * n, W * n)
    n = k.shape[0]
    labels = (torch.arange(n, device=q.device) + dist.rank() * n).repeat(num_layers)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def regression_loss(p, z, num_layers=1):
    """BYOL's L_ssl (Eq. 1): mean over rows of 2 - 2 cos(p, sg z). p (num_layers * n, D); z (n, D), repeated per
    layer."""
    p, z = F.normalize(p, dim=1), F.normalize(z.detach(), dim=1)
    return (2 - 2 * (p * z.repeat(num_layers, 1)).sum(dim=1)).mean()


def nt_xent_loss(q, z, temperature, num_layers=1):
    """SimCLR's NT-Xent (Eq. 2) with the final-layer outputs of both views as the candidates.

    z (2n, D): this rank's final projections [view 1; view 2], gathered from every rank (with gradient when z has
    one: the plain loss, q = z; without for L_isd, z detached). q (num_layers * 2n, D): anchors, layer by layer, each
    laid out as z. Anchor (view v, image i) has its positive at the other view's z of image i; its own view's z of
    image i is masked (for q = z that is the anchor itself). Mean cross-entropy over all anchors, no 2 tau factor."""
    q = F.normalize(q, dim=1)
    z_all = F.normalize(dist.gather_with_grad(z) if z.requires_grad else dist.gather(z), dim=1)  # (W * 2n, D)
    n2, offset = z.shape[0], z.shape[0] * dist.rank()
    own = (torch.arange(n2, device=q.device) + offset).repeat(num_layers)  # same view, same image: masked
    positive = ((torch.arange(n2, device=q.device) + n2 // 2) % n2 + offset).repeat(num_layers)
    logits = (q @ z_all.T / temperature).scatter(1, own[:, None], float("-inf"))  # (num_layers * 2n, W * 2n)
    return F.cross_entropy(logits, positive)


def sdssl_loss(cfg, student_out, teacher_out, alpha):
    """Eq. 6 / Alg. 1 for the framework; returns (total, {term: value}). student_out: per view (h, q, q_pred), each
    (K, n, D); teacher_out: per view z_L (n, D) (None for SimCLR)."""
    (h1, q1, qp1), (h2, q2, qp2) = student_out
    k = (h1 if q1 is None else q1).shape[0]  # layers used: K - 1 intermediate + the last
    terms = {}
    if cfg.framework == "simclr":
        u = torch.cat([h1[-1], h2[-1]])  # (2n, D): the final projections of both views
        terms["ssl"] = nt_xent_loss(u, u, cfg.temperature)
        if k > 1:  # each intermediate output of view v against the detached final outputs (isd)
            q_isd = torch.cat([h1[:-1], h2[:-1]], dim=1).flatten(0, 1)  # ((K-1) * 2n, D), layer by layer
            terms["isd"] = nt_xent_loss(q_isd, u.detach(), cfg.temperature, k - 1)
    else:
        ssl = (lambda q, z, m=1: contrastive_loss(q, z, cfg.temperature, m)) if cfg.framework == "mocov3" \
            else regression_loss
        z1, z2 = teacher_out
        terms["ssl"] = ssl(q1[-1], z2) + ssl(q2[-1], z1)  # symmetrised, each view against the other's teacher output
        if k > 1:
            terms["isd"] = ssl(q1[:-1].flatten(0, 1), z2, k - 1) + ssl(q2[:-1].flatten(0, 1), z1, k - 1)
        if qp1 is not None:  # Eq. 5: a sum over the K layers = K x the mean (Alg. 1: L * loss_pred)
            terms["pred"] = k * (ssl(qp1.flatten(0, 1), z2, k) + ssl(qp2.flatten(0, 1), z1, k))
    total = terms["ssl"] + alpha * terms.get("isd", 0.0) + cfg.beta * terms.get("pred", 0.0)
    return total, terms


# ================================================== training ==================================================

def train_one_epoch(model_ddp, views, model, teacher, loader, optimizer, scaler, cfg, ctx, epoch, step, total_steps):
    model_ddp.train()
    if teacher is not None:
        teacher.train()  # BN on batch statistics, as the student
    meters = {name: log.Meter() for name in ("loss", "ssl", "isd", "pred", "out_std")}
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (MoCo v3)
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=cfg.warmup_epochs * progress.total)
        optim.set_lr_wd(optimizer, lr)
        # Sec. 4.1: alpha follows a cosine ramp from 0 (cosine_scheduler(0, ratio) per iteration in the authors' code).
        alpha = (cfg.alpha_max if cfg.alpha_schedule == "constant"
                 else schedules.ramp_up(step, total_steps, cfg.alpha_max))
        x1, x2 = views(images)  # (n, 3, H, W) each, on the device
        with optim.autocast(cfg.amp, ctx.device):
            student_out = model_ddp([x1, x2])  # per view (h, q, q_pred), each (K, n, D)
            with torch.no_grad():
                teacher_out = (teacher(x1), teacher(x2)) if teacher is not None else None  # z_L per view
        student_out = [tuple(t.float() if t is not None else None for t in o) for o in student_out]  # losses in fp32
        teacher_out = tuple(z.float() for z in teacher_out) if teacher_out else None
        loss, terms = sdssl_loss(cfg, student_out, teacher_out, alpha)
        optim.step(loss, optimizer, scaler)
        m = schedules.ema_momentum(step, total_steps, cfg.base_momentum)
        if teacher is not None:  # the teacher moves right after the student's update (authors' code; BYOL Sec. 3.1)
            ema_update(teacher, model, m)
        target = teacher_out[0] if teacher_out else student_out[0][0][-1]  # z_L of view 1 (SimCLR: h_L)
        for name, value in [("loss", loss), ("out_std", log.output_std(target))] + list(terms.items()):
            meters[name].update(value, step)
        progress.log(i, step, meters["loss"], lr=lr, alpha=alpha)
        step += 1
    meters["loss"].check()
    row = {name: meter.global_avg() for name, meter in meters.items() if meter.count}
    return step, {**row, "lr": lr, "alpha": alpha, "momentum": m, **progress.stats()}


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data: MoCo v3's asymmetric augmentations (Sec. 4.1) -----
    size = data.image_size(cfg)
    channels_last = models.use_channels_last(cfg.arch, ctx.device)
    views = augment.ViewMaker(view_recipes(cfg, size), 2, ctx.device, cfg.aug_device, cfg.dataset, cfg.compile,
                              channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform, cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model: student with per-layer heads (DDP), teacher = EMA of backbone + last projector -----
    model, model_ddp, note = dist.prepare(build_student(cfg, size), ctx, cfg.sync_bn, cfg.compile, channels_last)
    depth = model.backbone.depth if models.is_vit(cfg.arch) else 4
    teacher = Teacher(model) if cfg.framework != "simclr" else None  # copied after DDP broadcast rank 0's weights
    heads = models.count_params(model) - models.count_params(model.backbone)
    print0(f"{note}; SD-{cfg.framework}, self-distillation on blocks {model.layers} of {depth}; backbone "
           f"{models.count_params(model.backbone) / 1e6:.2f}M params, heads {heads / 1e6:.2f}M; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr set every step; wd constant) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)
    states = dict(model=model, optimizer=optimizer, scaler=scaler, **({"teacher": teacher} if teacher else {}))
    # the authors evaluate the EMA teacher of SD-MoCo v3 / SD-BYOL everywhere (k-NN monitor, multi_exit.py,
    # linear_moco.py, uni_ali.py); SD-SimCLR has only the student. `--which auto` in eval/* reads this.
    evaluate = "teacher" if teacher else "model"

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, **states)

    # ----- epoch loop: train, log, evaluate (teacher backbone), checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, model, teacher, loader, optimizer, scaler, cfg, ctx, epoch,
                                    step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            if teacher is not None:
                dist.broadcast_buffers(teacher)  # the teacher is outside DDP: evaluate with rank 0's BN statistics
            row.update(knn.log_row((teacher or model).backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg), cfg.save_every,
                              evaluate=evaluate, **states)

    # ----- cleanup: export both backbones (per-layer evaluation: python -m eval.knn --layer all) -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, teacher and teacher.backbone, evaluate)
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
