"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He,
ICCV 2021, arXiv:2104.02057).

A base encoder (backbone, projector, predictor) makes queries q, a momentum encoder (backbone,
projector; an EMA of the base encoder, m cosine from m0 to 1) keys k. A query's positive is its
image's key from the other view, its negatives the N - 1 other keys of the global batch (no queue):
    L = ctr(q1, k2) + ctr(q2, k1),  ctr(q, k) = -2 tau log( e^{q.k+ / tau} / sum_i e^{q.k_i / tau} )
Reproduces (configs/mocov3/; each YAML header gives the source and the reported numbers):
- ImageNet ViT-S/16, 1 node (the defaults), and ViT-B/16: imagenet_vit_{small,base}.yaml;
- ImageNet ResNet-50, 100 epochs (the header: 300 and 1000): imagenet_resnet50.yaml;
- solo-learn's CIFAR-10/100 ResNet-18: cifar10_resnet18.yaml, cifar100_resnet18.yaml.
Deviations (the detail is at the named line or flag):
- bf16 autocast by default: `--amp`;
- the momentum update after the optimizer step, not in the next forward: `train_one_epoch`;
- the momentum encoder is outside DDP: per-rank BN running statistics: `dist.broadcast_buffers`;
- Gaussian blur with a kernel of 10% of the crop side, not PIL's: `view_recipes`;
- a k-NN monitor of the momentum encoder instead of a linear probe: `--eval_every`.

Run
    torchrun --standalone --nproc_per_node=8 mocov3.py \
        --config configs/mocov3/imagenet_vit_small.yaml --data_dir DIR
    torchrun --standalone --nproc_per_node=1 mocov3.py --config configs/mocov3/cifar10_resnet18.yaml
    python mocov3.py --dataset fake --arch resnet8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                  # a smoke run on the CPU
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, config, data, dist, log, models, optim, schedules
from common.config import arg
from common.log import print0
from eval.knn import KNNMonitor


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and /val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (official default 0.08; "
                                "ResNet-50 runs: 0.2)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    blur: bool = arg(True, "Gaussian blur p 1.0 / 0.1 on the two views (BYOL recipe); "
                           "solo-learn's CIFAR: off")
    # model
    arch: str = arg("vit_small", "backbone (vit_debug: tests; vit_mini and the CIFAR zoo, "
                                 "resnet8 ... wrn_40_2: small, for a CPU)", choices=models.ARCHS)
    patch_size: int = arg(16, "ViT patch size (16 or 32)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12, as MoCo v3; "
                            "SDSSL's: 6)")
    freeze_patch_embed: bool = arg(True, "ViT: frozen random patch projection (Sec. 4.2, "
                                         "`--stop-grad-conv1`)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (official "
                                         "code)")
    proj_hidden_dim: int = arg(4096, "projector hidden width (paper: 4096)")
    proj_dim: int = arg(256, "projector / predictor output dimension (paper: 256)")
    pred_hidden_dim: int = arg(4096, "predictor hidden width (paper: 4096)")
    sync_bn: bool = arg(True, "SyncBN across GPUs (official code); ignored on the CPU")
    # loss, momentum encoder and optimisation
    temperature: float = arg(0.2, "InfoNCE temperature tau (paper: 0.2 ViT, 1.0 ResNet-50)")
    base_momentum: float = arg(0.99, "m0, the momentum at step 0 (paper: 0.99; 0.996 for 1000 "
                                     "epochs)")
    optimizer: str = arg("adamw", "adamw (ViT), lars (ResNet) or sgd",
                         choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.5e-4, "base learning rate per 256 images; the peak is lr x batch_size / 256")
    weight_decay: float = arg(0.1, "weight decay (paper: 0.1 AdamW ViT, 1e-6 LARS ResNet-50)")
    exclude_bias_norm: bool = arg(False, "no weight decay (nor LARS adaptation) on biases, norms "
                                         "(official: false for AdamW ViT, true for LARS)")
    warmup_epochs: int = arg(40, "linear warmup epochs before the cosine decay (paper: 40 ViT, "
                                 "10 ResNet-50)")
    epochs: int = arg(300, "training epochs (paper: 300 ViT, 100/300/1000 ResNet-50)")
    batch_size: int = arg(1024, "global batch size over all GPUs (paper: 4096; 1024 for the "
                                "1-node ViT-S run)")
    lars_eta: float = arg(0.001, "LARS trust coefficient (paper: 0.001; solo-learn's CIFAR "
                                 "runs: 0.02)")
    lars_clip: bool = arg(False, "LARS: cap the local rate at the global one (solo-learn's CIFAR "
                                 "runs: true)")
    amp: str = arg("bf16", "mixed precision on CUDA: none, bf16 or fp16 (the official code's, "
                           "with a GradScaler)", choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the online model (and the batched augmentation's "
                               "hue op)")
    # run
    output_dir: str = arg("./out/mocov3", "where last.pt, log.jsonl, config.yaml, backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor (k 20 and 200, T 0.07) of the momentum encoder every "
                              "this many epochs (and the last); 0 = off. The paper's linear "
                              "probe (solo-learn: an online linear head) is not here")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ====================== method: encoders, InfoNCE loss, momentum update ======================

class MoCoV3(nn.Module):
    """Backbone f -> projector g -> predictor h. Without a predictor it is the momentum encoder
    (Alg. 1: f_k has no predictor). forward(x1, x2) encodes the two views in separate passes, so
    BN normalises each view over its own batch, as the official `builder.py` does."""

    def __init__(self, backbone, projector, predictor=None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def encode(self, x):
        z = self.projector(self.backbone(x))  # (n, proj_dim)
        return z if self.predictor is None else self.predictor(z)

    def forward(self, x1, x2):
        return self.encode(x1), self.encode(x2)


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size,
                                  num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    vit = models.is_vit(cfg.arch)
    # builder.py: ViT projector 3 layers, ResNet 2, both ending in an affine-free BN; the 2-layer
    # predictor ends in BN for ViT only (MoCo_ViT vs MoCo_ResNet). No biases: every Linear is
    # followed by BN or is the last layer.
    projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3 if vit else 2,
                           last_norm=True)
    predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_norm=vit)
    return MoCoV3(backbone, projector, predictor)


def build_momentum_encoder(model):
    """f_k, g_k: copies of the base encoder's backbone and projector (both start equal, Alg. 1),
    frozen: they change only through `ema_update`. Never wrapped in DDP; forward under no_grad."""
    return MoCoV3(copy.deepcopy(model.backbone),
                  copy.deepcopy(model.projector)).requires_grad_(False)


@torch.no_grad()
def ema_update(momentum_encoder, model, m):
    """Alg. 1: f_k.params = m * f_k.params + (1 - m) * f_q.params, for every parameter of the
    momentum encoder (frozen ones included, as the official code does), matched by name with the
    base encoder's."""
    online = dict(model.named_parameters())
    names, keys = zip(*momentum_encoder.named_parameters())
    optim.ema_(list(keys), [online[name] for name in names], m)


def mocov3_loss(q, k, temperature):
    """ctr(q, k) of Alg. 1 (InfoNCE, Eq. 1), one direction.

    q: (n, D) this rank's queries (predictor outputs), k: (n, D) keys of the other view from the
    momentum encoder (any scale: both are L2-normalised here). The keys of all ranks are gathered
    without gradient, so query i (global index i + rank * n) has its positive at column
    i + rank * n of the (n, W*n) logits and the W*n - 1 other keys as negatives. Cross-entropy
    times 2 tau, as the official code (the factor keeps the gradient's scale from growing as
    1/tau). Keeps the dtype of q. Returns the mean over this rank's n queries.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)  # stop-gradient: the keys come from the momentum encoder
    k_all = dist.gather(k)  # (W*n, D): rank r's keys at rows [r*n, (r+1)*n)
    logits = q @ k_all.T / temperature  # (n, W*n)
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + dist.rank() * n
    return F.cross_entropy(logits, labels) * (2 * temperature)


def view_recipes(cfg, size):
    """BYOL's asymmetric pair (view 1 always blurred, view 2 rarely blurred and sometimes
    solarised). The official code blurs with PIL's GaussianBlur(radius=sigma), which has no kernel
    size; ours is set in common/augment.py."""
    return augment.byol_recipes(size, crop_min=cfg.crop_min, blur=cfg.blur)


# ============================================ training ============================================

def train_one_epoch(model_ddp, views, model, momentum_encoder, loader, optimizer, scaler, cfg,
                    ctx, epoch, step, total_steps):
    model_ddp.train()
    # keys use batch statistics in BN, as in the official code (one model.train()); the running
    # statistics are never read in training
    momentum_encoder.train()
    meter, out_std = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Sec. 5)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        x1, x2 = views(images)  # (n, 3, H, W) each, on the device
        with optim.autocast(cfg.amp, ctx.device):
            q1, q2 = model_ddp(x1, x2)  # (n, proj_dim) each: predictions of the base encoder
            with torch.no_grad():
                k1, k2 = momentum_encoder(x1, x2)  # (n, proj_dim) each: keys, no predictor
        # Alg. 1: symmetrised, each view's query against the other view's keys; in float32
        loss = (mocov3_loss(q1.float(), k2.float(), cfg.temperature)
                + mocov3_loss(q2.float(), k1.float(), cfg.temperature))
        optim.step(loss, optimizer, scaler)
        # The momentum update for the keys of step t = step + 1. The official code makes it inside
        # step t's forward, before the keys, with m(t) (`--moco-m-cos`) and the weights left by
        # step t - 1; made here, right after step t - 1's optimizer step with m(t), it gives the
        # keys of every step the same weights. The official update at step 0 is a no-op (both
        # encoders start equal), and ours after the last step uses m(T) = 1 exactly, also a no-op.
        m = schedules.ema_momentum(step + 1, total_steps, cfg.base_momentum)
        ema_update(momentum_encoder, model, m)
        meter.update(loss, step)
        out_std.update(log.output_std(k1), step)  # collapse monitor, on the keys
        progress.log(i, step, meter, lr=lr, m=m)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "momentum": m,
                  "out_std": out_std.global_avg(), **log.output_spectrum(k1), **progress.stats()}


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

    # ----- model: base encoder (in DDP) and momentum encoder (copied after DDP's broadcast) -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    momentum_encoder = build_momentum_encoder(model)
    print0(f"{note}; params: backbone {models.count_params(model.backbone) / 1e6:.2f}M, "
           f"projector {models.count_params(model.projector) / 1e6:.2f}M, predictor "
           f"{models.count_params(model.predictor) / 1e6:.2f}M; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr is set every step in train_one_epoch; wd is constant) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0,
                                      lars_eta=cfg.lars_eta, lars_clip=cfg.lars_clip)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, teacher=momentum_encoder,
                                             optimizer=optimizer, scaler=scaler)

    # ----- epoch loop: train, log, evaluate (momentum encoder), checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, model, momentum_encoder, loader, optimizer,
                                    scaler, cfg, ctx, epoch, step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            # rank 0's BN statistics (per rank outside DDP; the official DDP broadcasts them)
            dist.broadcast_buffers(momentum_encoder)
            row.update(knn.log_row(momentum_encoder.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every,
                              evaluate="model",  # main_lincls.py probes the base encoder
                              model=model, teacher=momentum_encoder, optimizer=optimizer,
                              scaler=scaler)

    # ----- cleanup: export both backbones -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, momentum_encoder.backbone,
                               "model")
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
