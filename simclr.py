"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al.,
ICML 2020, arXiv:2002.05709).

Two augmented views of every image go through the same backbone f and projection head g; the
NT-Xent loss pulls the two projections of an image together and pushes away the other 2N - 2
projections of the global batch (gathered from every GPU, with gradient). The backbone is kept, the
head thrown away:
    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )      (Eq. 1)
Reproduces (configs/simclr/, each YAML header gives its source): CIFAR-10 ResNet-18 (the defaults;
App. B.9), ImageNet ResNet-50 (Sec. 4, App. B), SDSSL's SimCLR ViT baseline (vit_small).
Deviations (the detail is at the named line or flag):
- the head's last BN has no affine parameters (the TF code keeps a scale): `build_model`;
- LARS as MoCo v3's PyTorch version (momentum on the adapted gradient): common/optim.py `LARS`;
- the step is on the TF code's loss_a + loss_b, twice Eq. 1's mean: `--sum_directions`;
- a k-NN monitor instead of the paper's online linear head: `--eval_every`.

Run
    python simclr.py                                        # CIFAR-10, downloads it (1 GPU or CPU)
    torchrun --standalone --nproc_per_node=8 simclr.py \
        --config configs/simclr/imagenet_resnet50.yaml --data_dir DIR
    python simclr.py --dataset fake --arch resnet8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                  # a smoke run on the CPU
"""
import sys
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
    color_strength: float = arg(0.5, "colour distortion strength s (paper: 1 ImageNet, 0.5 CIFAR)")
    blur: bool = arg(False, "Gaussian blur p=0.5 (paper: on for ImageNet, off for CIFAR-10)")
    aug: str = arg("simclr", "simclr (Sec. 3) or byol (asymmetric pair, SDSSL's ViT baseline)",
                   choices=("simclr", "byol"))
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("resnet18", "backbone (vit_debug: tests; vit_mini and the CIFAR zoo, "
                                "resnet8 ... wrn_40_2: small, for a CPU)", choices=models.ARCHS)
    patch_size: int = arg(16, "ViT patch size (16 or 32)")
    num_heads: int = arg(0, "ViT heads; 0 = the arch's default (vit_small: 12, as MoCo v3)")
    freeze_patch_embed: bool = arg(True, "ViT: frozen random patch projection (MoCo v3, SDSSL)")
    zero_init_residual: bool = arg(True, "ResNet: zero-init the last BN of each block (TF code: "
                                         "init_zero=True)")
    proj_hidden_dim: int = arg(512, "head hidden width (paper: the backbone's, 2048 for R50)")
    proj_dim: int = arg(128, "projection output dimension (paper: 128)")
    proj_layers: int = arg(2, "projection head layers (paper: 2; SDSSL ViT: 3)")
    sync_bn: bool = arg(True, "SyncBN across GPUs (the paper's global BN); ignored on the CPU")
    # loss and optimisation
    temperature: float = arg(0.5, "NT-Xent tau (paper: 0.5 CIFAR-10 B512, 0.1 ImageNet B4096)")
    sum_directions: bool = arg(True, "step on loss_a + loss_b, the two views' mean losses, as the "
                                     "TF code (2x Eq. 1's mean: under LARS biases and BN take "
                                     "twice the step, wd weighs half); false = the mean (SDSSL's "
                                     "ViT baseline)")
    optimizer: str = arg("lars", "lars (paper), adamw (ViT) or sgd",
                         choices=("lars", "adamw", "sgd"))
    lr: float = arg(1.0, "base learning rate per 256 images; the peak is lr x batch_size / 256")
    weight_decay: float = arg(1e-4, "weight decay (paper: 1e-4 CIFAR-10, 1e-6 ImageNet; ViT: 0.1)")
    exclude_bias_norm: bool = arg(True, "no weight decay (nor LARS adaptation) on biases, norms")
    warmup_epochs: int = arg(10, "linear warmup epochs before the cosine decay (paper: 10)")
    epochs: int = arg(1000, "training epochs (paper CIFAR-10: 1000)")
    batch_size: int = arg(512, "global batch size over all GPUs (paper CIFAR-10: 512)")
    amp: str = arg("bf16", "mixed precision on CUDA: none, bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the model (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/simclr", "where last.pt, log.jsonl, config.yaml, backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor (k 20 and 200, T 0.07) every this many epochs (and "
                              "the last); 0 = off. The paper's online linear head is not here")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ============================= method: model, views and NT-Xent loss =============================

class SimCLR(nn.Module):
    """f (backbone) followed by g (projection head). forward(x) -> z (n, D)."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x):
        return self.projector(self.backbone(x))


def simclr_loss(z1, z2, temperature):
    """NT-Xent (Eq. 1), averaged over all 2N anchors of the global batch.

    z1, z2: (n, D) projections of the two views of this rank's n images (any scale; normalised
    here). Every projection is an anchor; its positive is the other view of the same image, and
    the 2N - 2 other projections of the global batch (gathered with gradient) are its negatives.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2n, D): view-1 rows, then view-2 rows
    z_all = dist.gather_with_grad(z)  # (W*2n, D): rank r's rows at [2n*r, 2n*(r+1))
    n, offset = z1.shape[0], 2 * z1.shape[0] * dist.rank()
    logits = z @ z_all.T / temperature  # (2n, W*2n) cosine similarities / tau
    rows = torch.arange(2 * n, device=z.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))  # an anchor is not its own negative
    positives = (rows + n) % (2 * n) + offset  # row i <-> row i + n: the other view, same image
    return F.cross_entropy(logits, positives)


def view_recipes(cfg, size):
    if cfg.aug == "byol":
        return augment.byol_recipes(size, crop_min=cfg.crop_min)
    return [augment.simclr_recipe(size, cfg.color_strength, cfg.blur, cfg.crop_min)]  # both views


def build_model(cfg, size):
    backbone = models.build_model(cfg.arch, image_size=size, patch_size=cfg.patch_size,
                                  num_heads=cfg.num_heads,
                                  stop_grad_patch_embed=cfg.freeze_patch_embed,
                                  zero_init_residual=cfg.zero_init_residual)
    # App. B: Linear -> BN -> ReLU -> Linear, then BN without affine (the TF code keeps a scale)
    projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                           last_norm=True)
    return SimCLR(backbone, projector)


# ============================================ training ============================================

def train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch, step,
                    total_steps):
    model_ddp.train()
    meter, out_std = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256  # linear scaling rule (Sec. B.1)
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        optim.set_lr_wd(optimizer, lr)
        # Both views in one forward pass: BN normalises over all 2n images (the paper's global BN)
        x = torch.cat(views(images))  # (2n, 3, H, W)
        with optim.autocast(cfg.amp, ctx.device):
            z = model_ddp(x).float()  # (2n, D); the loss in float32 (normalisation, exp)
        loss = simclr_loss(*z.chunk(2), cfg.temperature)  # Eq. 1: the mean over the 2N anchors
        if cfg.sum_directions:  # the TF code: loss_a + loss_b, each view's anchors averaged apart
            loss = 2 * loss
        optim.step(loss, optimizer, scaler)
        meter.update(loss, step)
        out_std.update(log.output_std(z), step)  # collapse monitor
        progress.log(i, step, meter, lr=lr)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "out_std": out_std.global_avg(),
                  **log.output_spectrum(z), **progress.stats()}


def main():
    # ----- config and distributed setup -----
    if "--method" in sys.argv[1:]:
        raise ConfigError("IFACLR (--method lwclr / simlwclr) has its own script: run python "
                          "ifaclr.py with the same flags (its configs are in configs/ifaclr/)")
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

    # ----- model -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    where = f"batched on {ctx.device.type}" if views.batched else "by torchvision"
    print0(f"{note}; views made {where}; backbone "
           f"{models.count_params(model.backbone) / 1e6:.2f}M params, head "
           f"{models.count_params(model.projector) / 1e6:.2f}M; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr, wd are set every step in train_one_epoch) -----
    groups = optim.param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm)
    optimizer = optim.build_optimizer(cfg.optimizer, groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, optimizer=optimizer, scaler=scaler)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, views, loader, optimizer, scaler, cfg, ctx, epoch,
                                    step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            row.update(knn.log_row(model.backbone))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every, model=model, optimizer=optimizer, scaler=scaler)

    # ----- cleanup -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone)
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
