"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al. 2020, arXiv:2002.05709).

Two augmented views of every image go through the same backbone f and projection head g; the NT-Xent loss
(Eq. 1) pulls the two projections of an image together and pushes away the other 2N-2 projections of the
global batch (gathered from every GPU, with gradient). The backbone is kept, the head thrown away.

IFACLR (`--method lwclr|simlwclr`; the IFACD slides, appendix A, and their prototype arkel23/layerwiseclr) is SimCLR
with layers as extra positives: the CLS tokens of the last N ViT blocks (`--layers N`), each through a new shared
LayerNorm and the same head, are positives of each other and of the other view's, and every other image's
representation at every layer is a negative, under the supervised contrastive loss without labels
(`ifaclr_loss`). lwclr: one view, the intermediate layers detached (they pull the last layer towards them, not the
other way); simlwclr: two views, each view's last layer with the other view's last N layers.

Reproduces
- CIFAR-10 (default; `configs/simclr/cifar10_resnet18.yaml`): the authors' CIFAR-10 command (App. B.9 and the
  official README): ResNet-18 with the CIFAR stem, batch 512, 1000 epochs, LARS with lr 1.0 x B/256, wd 1e-4,
  10 warmup epochs then cosine, tau 0.5, colour strength 0.5, no blur, 2-layer head 512 -> 128, the last BN of
  every residual block initialised to zero (the TF code's init_zero=True, also for ImageNet).
- ImageNet ResNet-50 (`imagenet_resnet50.yaml`): Sec. 4 / App. B: batch 4096, LARS lr 0.3 x B/256, wd 1e-6, tau 0.1,
  2-layer head 2048 -> 128, 100 epochs (the paper also reports 1000).
- ViT-S/16 (`imagenet_vit_small.yaml`): SDSSL's SimCLR baseline (Jang et al., arXiv:2111.12958): BYOL asymmetric
  augmentations, AdamW base lr 1.3e-4, wd 0.1, 40 warmup epochs, tau 0.2, 3-layer head 4096 -> 256.
- IFACLR (`ifaclr_*.yaml`): the prototype's defaults (METHODS.md section 8): last 2 blocks, tau 0.5, head 3 layers
  2048 -> 2048 with LayerNorm and GELU and a LayerNorm on the output, SGD momentum 0.9 lr 3e-4 at batch 64, wd 0,
  warmup then cosine, gradient clipping 1.0, fp32, SimCLR's augmentations. The slides' head is `--head slides`
  (FC, LN or BN, ReLU, FC). The slides report no numbers: what they name as obstacles (collapse, "layer 1 as similar
  as layer N => identity function") is logged per epoch as `layer_cos`, the mean cosine similarity between the
  first and the last used layer's projections of an image, and `python -m eval.knn --layer all --plot` shows the
  per-block k-NN of a trained checkpoint.
Known deviations
- The last BN of the head has no affine parameters (the TF code keeps a scale, no shift).
- LARS applies momentum to the adapted gradient and multiplies by lr afterwards (MoCo v3's PyTorch LARS); the TF
  version folds lr into the momentum buffer. Identical under a constant lr.
- The step is taken on the authors' loss: the TF code adds the two views' mean cross-entropies (loss_a + loss_b),
  twice the mean over the 2N anchors of Eq. 1 that simclr_loss returns (--sum_directions, on by default; log.jsonl
  reports that sum). Under LARS it matters: the biases and BN parameters (not adapted) take twice the step, and
  weight decay weighs half as much in the trust ratio. SDSSL's ViT baseline averages (its config turns it off).
- k-NN monitor (k = 20 and 200, T = 0.07) instead of the paper's online linear head. The eval tools (`--which auto`)
  evaluate the one network there is.
- IFACLR: the prototype normalises with CIFAR's mean and std (ImageNet's here), warms up for 1000 steps (whole
  epochs here) and may scale SupCon by tau / base_tau (1 here, as the IFACD fork's). With BN heads, the last N
  layers' rows share the BN statistics (one pass of the head over all of them). The backbone's final LayerNorm is
  not on the training path (the new shared one is), so it is frozen at its init and evaluation (the backbone's
  output, or --layer N) sees the CLS standardised by it.

Run
    python simclr.py                                                     # CIFAR-10, downloads it (1 GPU or CPU)
    torchrun --standalone --nproc_per_node=8 simclr.py --config configs/simclr/imagenet_resnet50.yaml --data_dir DIR
    python simclr.py --dataset fake --arch resnet18 --batch_size 8 --epochs 1 --max_steps_per_epoch 2 --device cpu
"""
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
    # data
    dataset: str = arg("cifar10", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder: data_dir/train and data_dir/val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (paper: 0.08)")
    color_strength: float = arg(0.5, "colour distortion strength s (paper: 1.0 ImageNet, 0.5 CIFAR-10)")
    blur: bool = arg(False, "Gaussian blur p=0.5 (paper: on for ImageNet, off for CIFAR-10)")
    aug: str = arg("simclr", "simclr (Sec. 3) or byol (asymmetric pair, SDSSL's ViT baseline)",
                   choices=("simclr", "byol"))
    # method
    method: str = arg("simclr", "simclr (NT-Xent), or IFACLR: lwclr (one view, layers as positives) or simlwclr "
                                "(two views)", choices=("simclr", "lwclr", "simlwclr"))
    layers: int = arg(2, "IFACLR: the last N ViT blocks are positives of each other (prototype: 2)")
    detach_layers: bool = arg(True, "IFACLR: no gradient through the intermediate layers' CLS (prototype: lwclr "
                                    "true, simlwclr false)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader workers), gpu (batched on the "
                                  "training device; in-memory datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("resnet18", "backbone (vit_debug: tests; vit_mini and the CIFAR zoo, resnet8 ... "
                                           "wrn_40_2: small, for a CPU)", choices=models.ARCHS)
    patch_size: int = arg(16, "ViT patch size (16 or 32)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12, as MoCo v3)")
    freeze_patch_embed: bool = arg(True, "ViT: frozen random patch projection (MoCo v3, SDSSL)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (TF code: init_zero=True)")
    proj_hidden_dim: int = arg(512, "projection head hidden width (paper: = backbone width, 2048 for R50)")
    proj_dim: int = arg(128, "projection output dimension (paper: 128)")
    proj_layers: int = arg(2, "projection head layers (paper: 2; SDSSL ViT: 3)")
    head: str = arg("simclr", "projection head: simclr (Linear-BN-ReLU, BN on the output), slides (IFACD slides: FC, "
                              "norm, ReLU, FC) or prototype (layerwiseclr: norm + GELU, norm on the output)",
                    choices=("simclr", "slides", "prototype"))
    head_norm: str = arg("bn", "norm of the slides / prototype heads (prototype: ln; its --bn_proj: bn)",
                         choices=("bn", "ln"))
    sync_bn: bool = arg(True, "SyncBN across GPUs (the paper's global BN); ignored on the CPU")
    # loss and optimisation
    temperature: float = arg(0.5, "NT-Xent temperature tau (paper: 0.5 CIFAR-10 B512, 0.1 ImageNet B4096)")
    sum_directions: bool = arg(True, "step on the sum of the two views' mean losses, 2x the mean over 2N anchors "
                                     "(the TF code's loss_a + loss_b); false = the mean (SDSSL's ViT baseline)")
    optimizer: str = arg("lars", "lars (paper), adamw (ViT) or sgd", choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.0, "base learning rate per 256 images; the peak lr is lr x batch_size / 256")
    weight_decay: float = arg(1e-4, "weight decay (paper: 1e-4 CIFAR-10, 1e-6 ImageNet; AdamW ViT: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay (and no LARS adaptation) for biases and norm parameters")
    warmup_epochs: int = arg(10, "linear warmup epochs before the cosine decay (paper: 10)")
    epochs: int = arg(1000, "training epochs (paper CIFAR-10: 1000)")
    batch_size: int = arg(512, "global batch size over all GPUs (paper CIFAR-10: 512)")
    clip_grad_norm: float = arg(0.0, "clip the global gradient norm to this; 0 = off (IFACLR prototype: 1.0)")
    amp: str = arg("bf16", "mixed precision on CUDA: none, bf16 or fp16", choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the model (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/simclr", "where last.pt, log.jsonl, config.yaml and backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = the full epoch (tests use 2)")
    eval_every: int = arg(10, "k-NN monitor every this many epochs (and after the last); 0 = off")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours, evenly spaced (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags given on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ===================================== method: model, views and NT-Xent loss =====================================

class SimCLR(nn.Module):
    """f (backbone) followed by g (projection head). forward(x) -> z (n, D).

    IFACLR (layers = N > 0): the CLS tokens of the last N ViT blocks, each through a new LayerNorm shared by the
    layers and then the same head: z (n, N, D), the last block last. With `detach`, the intermediate CLS tokens
    carry no gradient back into the backbone (the prototype's lwclr)."""

    def __init__(self, backbone, projector, layers=0, detach=False):
        super().__init__()
        self.backbone, self.projector, self.layers, self.detach = backbone, projector, layers, detach
        self.layer_norm = nn.LayerNorm(backbone.embed_dim) if layers else None
        if layers:  # the backbone's own final LayerNorm is off IFACLR's path: it stays a plain standardisation
            backbone.norm.requires_grad_(False)

    def forward(self, x):
        if not self.layers:
            return self.projector(self.backbone(x))
        _, tokens = self.backbone.forward_intermediates(x, norm=False)  # depth x (n, 1+T, d), raw block outputs
        cls = [t[:, 0] for t in tokens[-self.layers:]]  # N x (n, d)
        if self.detach:
            cls = [c.detach() for c in cls[:-1]] + cls[-1:]
        h = self.layer_norm(torch.stack(cls, dim=1))  # (n, N, d)
        return self.projector(h.flatten(0, 1)).view(x.shape[0], self.layers, -1)  # one pass of the head: (n, N, D)


def simclr_loss(z1, z2, temperature):
    """NT-Xent (SimCLR Eq. 1), averaged over all 2N anchors of the global batch.

    z1, z2: (n, D) projections of the two views of this rank's n images (any scale; L2-normalised here).
    Every projection is an anchor; its positive is the other view of the same image and the 2N - 2 other
    projections of the global batch (gathered from all ranks, with gradient) are its negatives.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2n, D): view-1 rows, then view-2 rows
    z_all = dist.gather_with_grad(z)  # (W*2n, D): rank r's rows at [2n*r, 2n*(r+1))
    n, offset = z1.shape[0], 2 * z1.shape[0] * dist.rank()
    logits = z @ z_all.T / temperature  # (2n, W*2n) cosine similarities / tau
    rows = torch.arange(2 * n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own negative
    positives = (rows + n) % (2 * n) + offset  # row i <-> row i + n: the other view of the same image
    return F.cross_entropy(logits, positives)


def ifaclr_loss(z, temperature):
    """IFACLR's loss (IFACD slides, appendix A: SupCon's L^sup_out, Khosla et al. 2020 Eq. 2, with an image's own
    views and layers as its positives instead of its label's images):
        L = 1/|I| sum_i -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / tau) / sum_{a in A(i)} exp(z_i . z_a / tau) )
    z: (n, V, D) this rank's n images x V representations (views x layers), any scale (L2-normalised here). Every
    one of them is an anchor i; P(i) = the other V - 1 of its image, A(i) = every representation of the global batch
    but i itself (gathered from all ranks with gradient). Returns the mean over this rank's n * V anchors."""
    n, v, _ = z.shape
    z = F.normalize(z, dim=2).flatten(0, 1)  # (nV, D): row i*V + j = representation j of image i
    z_all = dist.gather_with_grad(z)  # (W*nV, D): rank r's rows at [nV*r, nV*(r+1))
    rows = torch.arange(n * v, device=z.device) + n * v * dist.rank()  # the anchors' global row numbers
    cols = torch.arange(z_all.shape[0], device=z.device)
    own = cols[None, :] == rows[:, None]  # (nV, W*nV): the anchor itself, left out of A(i)
    positive = (cols[None, :] // v == rows[:, None] // v) & ~own  # the same image, another view or layer
    log_prob = (z @ z_all.T / temperature).masked_fill(own, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (v - 1)).mean()


def ifaclr_objective(cfg, z):
    """lwclr: z (n, N, D), one view's last N layers are the positives. simlwclr: z (2n, N, D), both views; each
    view's last layer with the other view's N layers, both ways, averaged."""
    if cfg.method == "lwclr":
        return ifaclr_loss(z, cfg.temperature)
    z1, z2 = z.chunk(2)  # (n, N, D) each
    return 0.5 * (ifaclr_loss(torch.cat([z1[:, -1:], z2], dim=1), cfg.temperature)  # (n, 1 + N, D)
                  + ifaclr_loss(torch.cat([z2[:, -1:], z1], dim=1), cfg.temperature))


def view_recipes(cfg, size):
    if cfg.aug == "byol":
        return augment.byol_recipes(size, crop_min=cfg.crop_min)
    return [augment.simclr_recipe(size, cfg.color_strength, cfg.blur, cfg.crop_min)]  # both views, the same recipe


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size, num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    d, hidden, out = backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim
    if cfg.head == "simclr":  # App. B: Linear -> BN -> ReLU -> Linear, BN on the output (no affine)
        projector = models.mlp(d, hidden, out, cfg.proj_layers, last_norm=True)
    elif cfg.head == "slides":  # IFACD slides' contrastive head: FC, LN/BN1d, ReLU, FC
        projector = models.mlp(d, hidden, out, 2, last_norm=False, norm=cfg.head_norm)
    else:  # layerwiseclr heads.py: LN + GELU (BN + ReLU with --bn_proj), a norm on the output
        projector = models.mlp(d, hidden, out, cfg.proj_layers, norm=cfg.head_norm,
                               act="gelu" if cfg.head_norm == "ln" else "relu")
    if cfg.method == "simclr":
        return SimCLR(backbone, projector)
    if not models.is_vit(cfg.arch) or not 2 <= cfg.layers <= backbone.depth:
        raise ConfigError(f"--method {cfg.method} needs a ViT and 2 <= --layers <= its depth; got {cfg.arch}, "
                          f"layers {cfg.layers}")
    return SimCLR(backbone, projector, cfg.layers, cfg.detach_layers)


# ================================================== training ==================================================

def train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch, step, total_steps):
    model_ddp.train()
    meter, layer_cos = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Sec. B.1)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        # Both views in one forward pass, so BN normalises over all 2n images (the paper's global BN).
        x = torch.cat(views(images))  # (2n, 3, H, W); lwclr: one view, (n, 3, H, W)
        with optim.autocast(cfg.amp, ctx.device):
            z = model_ddp(x).float()  # (2n, D), IFACLR (views * n, N, D); the loss in float32 (normalisation, exp)
        if cfg.method == "simclr":
            loss = simclr_loss(*z.chunk(2), cfg.temperature)  # Eq. 1: the mean over the 2N anchors
            if cfg.sum_directions:  # the TF code: loss_a + loss_b, each view's anchors averaged on their own
                loss = 2 * loss
        else:
            loss = ifaclr_objective(cfg, z)
            # The slides' obstacle "layer 1 as similar as layer N => identity function", measured.
            layer_cos.update(F.cosine_similarity(z[:, 0], z[:, -1], dim=-1).mean(), step)
        optim.step(loss, optimizer, scaler, cfg.clip_grad_norm, model_ddp.parameters())
        meter.update(loss, step)
        progress.log(i, step, meter, lr=lr)
        step += 1
    meter.check()
    extra = {"layer_cos": layer_cos.global_avg()} if layer_cos.count else {}
    return step, {"loss": meter.global_avg(), "lr": lr, **extra, **progress.stats()}


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
    views = augment.ViewMaker(view_recipes(cfg, size), 1 if cfg.method == "lwclr" else 2, ctx.device, cfg.aug_device,
                              cfg.dataset, cfg.compile, channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", views.transform, cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile, channels_last)
    where = f"batched on {ctx.device.type}" if views.batched else "by torchvision"
    print0(f"{note}; views made {where}; backbone {models.count_params(model.backbone) / 1e6:.2f}M params, head "
           f"{models.count_params(model.projector) / 1e6:.2f}M; {len(dataset)} images, {steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr, wd are set every step in train_one_epoch) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, optimizer=optimizer, scaler=scaler)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch, step,
                                    cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            row.update(knn.log_row(model.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg), cfg.save_every,
                              model=model, optimizer=optimizer, scaler=scaler)

    # ----- cleanup -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone)
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
