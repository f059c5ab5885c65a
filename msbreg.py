"""MSBReg: An Embedding-Dynamic Approach to Self-supervised Learning (Moon, Buracas, Park, Kim,
Canny; WACV 2023, arXiv:2207.03552).

BYOL's online network (f, g, h) and EMA target (f', g') see K same-resolution views of an image:
    L = L_c + lambda_s L_s + lambda_b L_b                                                   (Eq. 2)
the multiview centroid loss L_c (Eq. 3) pulls every view to the centroid of the K targets; the
singular value loss L_s (Eq. 5-6) and the Brownian diffusion loss L_b (Eq. 4) spread them out.
Reproduces (configs/msbreg/; each YAML header gives the tables and the reported numbers):
- STL-10 K = 4, BN (the defaults; Table 1) and LN heads (Table 13): stl10_resnet18_{k4,ln}.yaml;
- ImageNet-100 K = 2 / 4 / 8 (Tables 1, 8, 11): imagenet100_resnet18_k{2,4,8}.yaml;
- ImageNet ResNet-50 K = 4 (Table 2): imagenet_resnet50_k4.yaml.
Choices the paper leaves open (it has no code; METHODS.md section 7), the detail at the name:
- L_s on the unnormalised predictions, over the global batch: `singular_value_loss`;
- L_c as Eq. 3 is written (view j is in its own centroid); two other readings: `--centroid`;
- BYOL's values where the paper gives none: `view_recipes`, `--target_decay`, LARS in `main`;
- each network sees the K views in one pass (BN over all K*n images): `train_one_epoch`;
- BYOL's heads (no output norm, no last bias): `build_model`; LN in the heads only: `--head_norm`.

Run
    python msbreg.py                                    # STL-10, K = 4, downloads it (1 GPU or CPU)
    torchrun --standalone --nproc_per_node=8 msbreg.py \
        --config configs/msbreg/imagenet100_resnet18_k4.yaml --data_dir /data/imagenet
    python msbreg.py --dataset fake --arch resnet8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu --eval_every 0   # a smoke run on the CPU
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
    # data
    dataset: str = arg("stl10", "training images (paper: stl10, imagefolder + class_list for "
                                "ImageNet-100, imagenet)", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder: data_dir/train and data_dir/val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    class_list: str = arg("", "imagefolder/imagenet only: file of class folders to keep "
                              "(ImageNet-100: configs/imagenet100_classes.txt)")
    image_size: int = arg(0, "crop size; 0 = the dataset's (96 STL-10, 224 ImageNet)")
    num_views: int = arg(4, "K views per image, all at the same resolution (paper: 2, 4, 8)")
    crop_min: float = arg(0.08, "smallest random-resized-crop scale (not given in the paper; "
                                "BYOL's 0.08)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # model
    arch: str = arg("resnet18", "backbone (paper: resnet18 for STL-10/ImageNet-100, resnet50 for "
                                "ImageNet)", choices=models.ARCHS)
    proj_hidden_dim: int = arg(512, "hidden width of projector and predictor (paper R18: 512; "
                                    "BYOL R50: 4096)")
    proj_dim: int = arg(128, "output width of projector and predictor (paper R18: 128; BYOL R50: "
                             "256)")
    zero_init_residual: bool = arg(True, "zero-init the last BN of each residual block (not "
                                         "given; BYOL's init)")
    head_norm: str = arg("bn", "norm in the heads' hidden layer (Table 13: ln, where BYOL "
                               "collapses; the backbone keeps BN)", choices=("bn", "ln"))
    sync_bn: bool = arg(True, "SyncBN across GPUs (global batch statistics); ignored on the CPU")
    # loss
    centroid: str = arg("all", "L_c: all (Eq. 3 as written), others (leave-one-out centroid) or "
                               "none (BYOL's loss over the view pairs, Table 8's BYOL rows; the "
                               "K = 2 config)", choices=("all", "others", "none"))
    lambda_s: float = arg(4e-3, "weight of the singular value loss L_s (Table 11: 4e-3; 0 = off)")
    lambda_b: float = arg(0.5, "weight of the Brownian diffusion loss L_b (Table 11: 0.5; STL-10 "
                               "LN: 5e-3; 0 = off)")
    target_decay: float = arg(0.996, "the target's EMA rate tau at step 0, cosine to 1 per step "
                                     "(not given; BYOL's 0.996)")
    # optimisation (Sec. 7.1)
    lr: float = arg(0.5, "base lr; peak lr = lr x batch_size / 256 x num_views (0.5 STL-10, 0.4 "
                         "IN-100, 0.15 IN)")
    weight_decay: float = arg(1e-5, "LARS weight decay; biases and norm parameters are excluded "
                                    "(paper: 1e-5)")
    warmup_epochs: int = arg(10, "linear warmup epochs before the cosine decay (paper: 10)")
    epochs: int = arg(320, "training epochs (paper: 320 STL-10 / ImageNet-100, 300 ImageNet)")
    batch_size: int = arg(512, "global batch size over all GPUs (paper: 512; Table 13: 256)")
    amp: str = arg("bf16", "mixed precision on CUDA: none, bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the online model (and the batched augmentation's "
                               "hue op)")
    # run
    output_dir: str = arg("./out/msbreg", "where last.pt, log.jsonl, config.yaml, backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor (k 5, 20 and 200, T 0.07) of the target backbone "
                              "every this many epochs (and the last); 0 = off. The paper's "
                              "linear probe is not here")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ======================= method: networks, the three loss terms, EMA target =======================

class MSBRegNet(nn.Module):
    """Online network f -> g -> h, forward(x) -> (z, p); or, without a predictor, the target
    f' -> g' -> z'."""

    def __init__(self, backbone, projector, predictor=None):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z if self.predictor is None else (z, self.predictor(z))


def centroid_loss(p, z, leave_one_out=False):
    """Multiview centroid loss L_c (Eq. 3), averaged over the batch: an attractive force that
    pulls the "fast" online views to the "slow" targets.

    p: (K, B, D) online predictions; z: (K, B, D) target projections (stop-gradient here). Both are
    L2-normalised; L_c = 1/K sum_j || p^_j - 1/K sum_l z^'_l ||^2, the centroid including view j
    and not re-normalised (Eq. 3 read literally). Up to a constant of the target, this is the mean
    over all K^2 pairs (j, l) of || p^_j - z^'_l ||^2 (Sec. 3.2).
    leave_one_out: view j's centroid is that of the other K - 1 target views, 1/(K-1) sum_{l != j}
    z^'_l (a reading of Eq. 3 that never pulls view j to its own target, as BYOL; for K = 2 this is
    half of BYOL's symmetrised loss).
    """
    num_views = p.shape[0]
    p = F.normalize(p, dim=-1)
    z = F.normalize(z.detach(), dim=-1)
    c = z.mean(dim=0)  # (B, D): centroid of the K normalised target views
    if leave_one_out:
        c = (num_views * c - z) / (num_views - 1)  # (K, B, D): view j's centroid without z^'_j
    return (p - c).pow(2).sum(dim=-1).mean()  # mean over the K views and the B images


def cross_view_loss(p, z):
    """The "without L_c" loss (Table 8's BYOL rows; the multi-crop BYOL of App. Table 7): BYOL's
    || p^_j - z^'_l ||^2 = 2 - 2 cos summed over the K(K-1) ordered pairs of different views
    j != l, averaged over the batch. For K = 2 this is BYOL's symmetrised loss L + L~ (Eq. 1).
    p, z: (K, B, D)."""
    num_views = p.shape[0]
    cos = torch.einsum("jbd,lbd->jlb", F.normalize(p, dim=-1),
                       F.normalize(z.detach(), dim=-1))  # (K, K, B)
    # the ordered pairs j != l, row by row, by arithmetic on the device (a boolean mask would make
    # the GPU wait for the host to count its entries)
    m = torch.arange(num_views * (num_views - 1), device=p.device)
    j, l = m // (num_views - 1), m % (num_views - 1)
    l = l + (l >= j)  # skip the diagonal
    pair_cos = cos.flatten(0, 1)[j * num_views + l]  # (K(K-1), B)
    return (2 - 2 * pair_cos).sum(dim=0).mean()  # sum over the pairs, mean over the images


def singular_value_loss(p):
    """Singular value loss L_s (Eq. 5-6), a global dispersive force: 1/K sum_j || S_j - I_d ||_F^2
    = 1/K sum_j sum_i (sigma_ij - 1)^2 (Eq. 7).

    p: (K, B, D) online predictions of this rank's B images, unnormalised as Eq. 5 writes them (the
    text says "projections p^"). S_j is the unbiased (N - 1) covariance of view j over the global
    batch of N images, gathered from all ranks with gradient, so the loss does not depend on the
    GPU count: every rank computes the same value and DDP's gradient average gives the full-batch
    gradient.
    """
    # (B, K, D) per rank -> (N, K, D), rank r's images at rows [r*B, (r+1)*B)
    p = dist.gather_with_grad(p.transpose(0, 1).contiguous())
    p = p - p.mean(dim=0, keepdim=True)
    cov = torch.einsum("nkd,nke->kde", p, p) / (p.shape[0] - 1)  # (K, D, D): S_j of Eq. 5
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return (cov - eye).pow(2).sum(dim=(1, 2)).mean()  # Eq. 6, mean over the K views


def brownian_noise(num_views, batch, dim, device=None, dtype=None):
    """n ~ N(0, I_d), one draw per image, the same for its K views (Sec. 3.2). Returns (K, B, D)
    from torch's RNG (reseeded every epoch per rank, so runs resume bit-exactly); call it afresh
    every step."""
    n = torch.randn(batch, dim, device=device, dtype=dtype)  # (B, D): one direction per image
    return n.expand(num_views, batch, dim)  # (K, B, D): shared by the K views of an image


def brownian_loss(p, n):
    """Brownian diffusion loss L_b (Eq. 4), averaged over the batch: 1/K sum_j <n^, p^_j>.

    p: (K, B, D) online predictions; n: (K, B, D) (or broadcastable, e.g. (B, D)) Gaussian noise
    from brownian_noise. Both are L2-normalised here; minimising drives p^ towards -n^ (a random
    walk on the sphere: a local dispersive force that keeps LayerNorm heads from collapsing,
    Table 13).
    """
    return (F.normalize(n, dim=-1) * F.normalize(p, dim=-1)).sum(dim=-1).mean()


def msbreg_loss(p, z, n, lambda_s=4e-3, lambda_b=0.5, centroid="all"):
    """Eq. 2, the weighted sum of the three terms. p, z, n: (K, B, D) predictions, target
    projections, noise. centroid (Config.centroid) picks L_c: centroid_loss for 'all' and 'others',
    cross_view_loss for 'none'. Returns (loss, detached parts for logging)."""
    l_c = (cross_view_loss(p, z) if centroid == "none"
           else centroid_loss(p, z, leave_one_out=centroid == "others"))
    l_s = singular_value_loss(p)
    l_b = brownian_loss(p, n)
    loss = l_c + lambda_s * l_s + lambda_b * l_b
    return loss, {"loss_c": l_c.detach(), "loss_s": l_s.detach(), "loss_b": l_b.detach()}


@torch.no_grad()
def ema_update(target, online, tau):
    """xi <- tau xi + (1 - tau) theta for every target parameter (Sec. 3.1): the plain EMA, after
    every step (the paper calls its EMA "bias-corrected" without saying more). The target's BN
    running statistics are its own (it runs in train mode)."""
    theta = dict(online.named_parameters())
    names, xi = zip(*target.named_parameters())
    optim.ema_(list(xi), [theta[name] for name in names], tau)


def view_recipes(cfg, size):
    """Table 9: one recipe for every view, without BYOL's asymmetry: crop, flip 0.5, jitter
    (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0, solarize 0.2. Not given, so BYOL's: the
    crop scale (--crop_min), the blur kernel and sigma (common/augment.py: 10% of the side, sigma
    in [0.1, 2]) and the solarize threshold 128."""
    return [augment.Recipe(size, (cfg.crop_min, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0,
                           solarize_p=0.2)]


def build_model(cfg, size):
    # not given: STL-10's 96 px get the ImageNet stem (models.build_model: CIFAR stem at <= 32 px)
    backbone = models.build_model(cfg.arch, image_size=size,
                                  zero_init_residual=cfg.zero_init_residual)

    # Sec. 7.2: 2-layer MLP, BN (or LN, Table 13) + ReLU; BYOL's output Linear (no bias, no norm:
    # networks.py)
    def head(in_dim):
        return models.mlp(in_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_norm=False,
                          norm=cfg.head_norm)
    return MSBRegNet(backbone, head(backbone.embed_dim), head(cfg.proj_dim))


def check(cfg):
    if cfg.num_views < 2:
        raise ConfigError(f"num_views must be at least 2 (the centroid of one view is itself), "
                          f"got {cfg.num_views}")
    if cfg.class_list and cfg.dataset not in ("imagefolder", "imagenet"):
        raise ConfigError(f"class_list only applies to imagefolder/imagenet, not {cfg.dataset}")


# ============================================ training ============================================

METRICS = ("loss", "loss_c", "loss_s", "loss_b", "embed_std", "pred_std", "out_std")


def train_one_epoch(model_ddp, view_maker, model, target, loader, optimizer, scaler, cfg, ctx,
                    epoch, step, total_steps):
    model_ddp.train()
    target.train()  # BYOL: the target also normalises with batch statistics
    meters = {name: log.Meter() for name in METRICS}
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    peak_lr = cfg.lr * cfg.batch_size / 256 * cfg.num_views  # Sec. 7.1: base_lr x B / 256 x K
    warmup_steps = cfg.warmup_epochs * progress.total
    for i, (images, _) in enumerate(progress):
        lr = schedules.cosine(step, total_steps, peak_lr, warmup_steps=warmup_steps)
        tau = schedules.ema_momentum(step, total_steps, cfg.target_decay)
        optim.set_lr_wd(optimizer, lr)
        views = view_maker(images)  # K x (B, 3, H, W), on the device
        num_views, batch = len(views), views[0].shape[0]
        # All K views through each network in one pass, so BN normalises over all K*B images (BYOL
        # forwards its two views apart): K x (B, 3, H, W) -> (K*B, 3, H, W), view-major.
        x = torch.cat(views)
        with optim.autocast(cfg.amp, ctx.device):
            z_online, p = model_ddp(x)  # (K*B, D) each
            with torch.no_grad():
                z = target(x)  # (K*B, D): target projections z', no gradient (stop-gradient, Eq. 1)
        # (K*B, D) -> (K, B, D); the losses in float32 (normalisation, covariance: not in bf16)
        p, z, z_online = (t.float().view(num_views, batch, -1) for t in (p, z, z_online))
        noise = brownian_noise(num_views, batch, p.shape[-1], device=ctx.device)  # fresh every step
        loss, parts = msbreg_loss(p, z, noise, cfg.lambda_s, cfg.lambda_b, cfg.centroid)
        optim.step(loss, optimizer, scaler)
        ema_update(target, model, tau)  # Sec. 3.1: after the optimizer step, with this step's tau
        # collapse monitors (log.output_std): online projections, predictions and the targets
        values = {"loss": loss, **parts, "embed_std": log.output_std(z_online),
                  "pred_std": log.output_std(p), "out_std": log.output_std(z)}
        for name, value in values.items():
            meters[name].update(value, step)
        progress.log(i, step, meters["loss"], lr=lr, tau=tau)
        step += 1
    meters["loss"].check()
    row = {name: m.global_avg() for name, m in meters.items()}
    return step, {**row, **log.output_spectrum(z[0]), "lr": lr, "tau": tau, **progress.stats()}


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    check(cfg)
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data: K views of every image from one recipe (Table 9) -----
    size = data.image_size(cfg)
    channels_last = models.use_channels_last(cfg.arch, ctx.device)
    view_maker = augment.ViewMaker(view_recipes(cfg, size), cfg.num_views, ctx.device,
                                   cfg.aug_device, cfg.dataset, cfg.compile, channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", view_maker.transform,
                                 cfg.download, class_list=cfg.class_list)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     class_list=cfg.class_list, bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model: online network (DDP) and its EMA target -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    # The target is a copy taken after DDP has broadcast rank 0's weights; it never gets gradients
    # or DDP.
    target = MSBRegNet(copy.deepcopy(model.backbone),
                       copy.deepcopy(model.projector)).requires_grad_(False)
    heads = models.count_params(model.projector) + models.count_params(model.predictor)
    print0(f"{note}; backbone {models.count_params(model.backbone) / 1e6:.2f}M params, heads "
           f"{heads / 1e6:.2f}M; K = {cfg.num_views} views; {len(dataset)} images, "
           f"{steps_per_epoch} steps/epoch")

    # ----- optimizer and schedules (lr and tau are set every step in train_one_epoch) -----
    groups = optim.param_groups(model, cfg.weight_decay, exclude_bias_norm=True)  # Sec. 7.1
    # Sec. 7.1: LARS; its momentum 0.9 and trust coefficient 1e-3 are not given (BYOL's, the
    # defaults of optim.build_optimizer)
    optimizer = optim.build_optimizer("lars", groups, lr=0.0)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, model=model, teacher=target, optimizer=optimizer,
                                             scaler=scaler)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, view_maker, model, target, loader, optimizer,
                                    scaler, cfg, ctx, epoch, step, cfg.epochs * steps_per_epoch)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            dist.broadcast_buffers(target)  # the target is outside DDP: use rank 0's BN statistics
            # Table 1: 5-NN; Table 4: 20/200-NN
            row.update(knn.log_row(target.backbone, ks=(5, 20, 200)))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every,
                              evaluate="model",  # the online backbone is the representation (BYOL)
                              model=model, teacher=target, optimizer=optimizer, scaler=scaler)

    # ----- cleanup: export both backbones -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, target.backbone, "model")
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
