"""SimSiam and BYOL with guided stop-gradient (GSG): Implicit Contrastive Representation Learning
with Guided Stop-gradient (Lee & Lee, NeurIPS 2023, appendix A-C; code: github.com/bych-lee/gsg).

SimSiam (Chen & He, arXiv:2011.10566): L = D(p1, sg z2) / 2 + D(p2, sg z1) / 2, D = -cosine. GSG
pairs each image i with a partner r(i) from the same GPU's batch and views both twice (11, 12 of
i; 21, 22 of r(i)); the closest cross-image pair of projections (1a, 2b) goes through the
predictor, and their siblings (1a', 2b') are the targets, which pushes the two images apart
without negatives (Alg. 1):
    l_i = -1/2 [cos(p_1a, sg z_1a') + cos(p_2b, sg z_2b')],  (1a, 2b) = argmin_{a,b} |z_1a - z_2b|
Reproduces (configs/simsiam_gsg/; each YAML header gives the source of every value):
- ImageNet ResNet-50 (the defaults: simsiam_gsg): imagenet_resnet50_{simsiam,byol}{,_gsg}.yaml;
- CIFAR-10 ResNet-18, lightly's benchmark where the appendix is silent: cifar10_resnet18_*.yaml.
Deviations (the detail is at the named line or flag):
- `--base byol`'s momentum encoder copies the whole model (the predictor unused): `main`;
- the projector's last Linear has no bias; CIFAR-10's network is not lightly's: `build_model`;
- lr x batch_size / 256 where lightly's CIFAR-10 lr is fixed: the cifar10 YAML headers;
- a k-NN monitor of the online backbone, not lightly's: `--eval_every`, `--knn_temperature`.

Run
    torchrun --standalone --nproc_per_node=8 simsiam_gsg.py \
        --config configs/simsiam_gsg/imagenet_resnet50_simsiam_gsg.yaml --data_dir DIR
    python simsiam_gsg.py --config configs/simsiam_gsg/cifar10_resnet18_byol_gsg.yaml  # 1 GPU
    python simsiam_gsg.py --dataset fake --arch resnet8 --batch_size 8 --epochs 1 \
        --max_steps_per_epoch 2 --device cpu                  # a smoke run on the CPU
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
    dataset: str = arg("imagenet", "training images", choices=data.DATASETS)
    data_dir: str = arg("./data", "dataset root (imagefolder/imagenet: data_dir/train and /val)")
    download: bool = arg(True, "download cifar10/cifar100/stl10 through torchvision if missing")
    image_size: int = arg(0, "crop size; 0 = the dataset's (32 CIFAR, 96 STL-10, 224 ImageNet)")
    crop_min: float = arg(0.2, "RandomResizedCrop min scale (App. B.1 ImageNet: 0.2; B.2 "
                               "CIFAR-10: 0.08)")
    blur: bool = arg(True, "Gaussian blur p=0.5 (App. B.1: on for ImageNet; B.2: off for "
                           "CIFAR-10)")
    aug_device: str = arg("auto", "where views are made: cpu (torchvision in the loader "
                                  "workers), gpu (batched on the training device; in-memory "
                                  "datasets), auto (gpu on CUDA when possible)",
                          choices=("auto", "cpu", "gpu"))
    # method
    base: str = arg("simsiam", "simsiam (online targets) or byol (targets and GSG distances from "
                               "a momentum encoder, with SimSiam's heads and loss: gsg/builder.py "
                               "BYOL, BYOLGSG)", choices=("simsiam", "byol"))
    gsg: bool = arg(True, "guided stop-gradient on 4 views (Alg. 1); false = the base method on "
                          "2 views")
    stop_grad: bool = arg(True, "stop-gradient on the targets; false = SimSiam's ablation (Sec. "
                                "4.1, Fig. 2), which collapses (base simsiam, gsg false)")
    ema_momentum: float = arg(0.99, "BYOL target momentum m, constant (gsg/builder.py: 0.99)")
    # model
    arch: str = arg("resnet50", "backbone (C.1: resnet50; C.2: resnet18, CIFAR stem)",
                    choices=models.ARCHS)
    zero_init_residual: bool = arg(True, "zero-init the last BN of each residual block (SimSiam "
                                         "code; lightly: off)")
    proj_hidden_dim: int = arg(2048, "projector hidden width (C.1, C.2: 2048)")
    proj_dim: int = arg(2048, "projector output dimension (C.1, C.2: 2048)")
    proj_layers: int = arg(3, "projector layers (C.1 ImageNet: 3; C.2 CIFAR-10: 2)")
    pred_hidden_dim: int = arg(512, "predictor bottleneck width (C.1: 512)")
    sync_bn: bool = arg(True, "SyncBN across GPUs (SimSiam/GSG code); ignored on the CPU")
    # optimisation (SimSiam's recipe: SGD, cosine per epoch, no warmup)
    lr: float = arg(0.05, "base learning rate per 256 images; the peak is lr x batch_size / 256 "
                          "(SimSiam: 0.05)")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(1e-4, "weight decay (SimSiam: 1e-4 on all parameters; lightly "
                                    "CIFAR-10: 5e-4)")
    exclude_bias_norm: bool = arg(False, "no weight decay for biases and norm parameters "
                                         "(SimSiam: false)")
    fix_pred_lr: bool = arg(True, "keep the predictor at the peak lr (SimSiam/GSG README: "
                                  "--fix-pred-lr)")
    warmup_epochs: int = arg(0, "linear warmup epochs before the cosine (SimSiam: 0)")
    lr_schedule: str = arg("cosine", "cosine (SimSiam's, per epoch) or constant (the peak lr "
                                     "throughout: the first epochs of a long cosine, as in Fig. 2)",
                           choices=("cosine", "constant"))
    epochs: int = arg(100, "training epochs (GSG ImageNet: 100)")
    batch_size: int = arg(512, "global batch size over all GPUs (GSG ImageNet: 512)")
    amp: str = arg("none", "mixed precision on CUDA: none (the authors' fp32), bf16 or fp16",
                   choices=("none", "bf16", "fp16"))
    compile: bool = arg(False, "torch.compile the model (and the batched augmentation's hue op)")
    # run
    output_dir: str = arg("./out/simsiam_gsg", "where last.pt, log.jsonl, config.yaml, "
                                               "backbone.pt go")
    seed: int = arg(0, "random seed")
    device: str = arg("auto", "auto, cuda or cpu", choices=("auto", "cuda", "cpu"))
    num_workers: int = arg(8, "data-loading workers per GPU")
    max_steps_per_epoch: int = arg(0, "stop each epoch after this many steps; 0 = a full epoch")
    eval_every: int = arg(10, "k-NN monitor (k 20 and 200) of the online backbone every this "
                              "many epochs (and the last); 0 = off. lightly's benchmark: k 200")
    knn_bank: int = arg(0, "k-NN monitor: this many training images as neighbours (0 = all)")
    knn_temperature: float = arg(0.07, "k-NN vote temperature (DINO: 0.07; lightly's CIFAR-10 "
                                       "benchmark: 0.1)")
    log_every: int = arg(50, "print a progress line every this many steps")
    save_every: int = arg(0, "also keep epoch_XXXX.pt every this many epochs; 0 = only last.pt")
    config: str = arg("", "YAML file with any of these fields (flags on the command line win)")
    resume: str = arg("", "checkpoint to resume from; default: output_dir/last.pt if it exists")


# ================= method: model, partner shuffle, losses, momentum update =================

class SimSiam(nn.Module):
    """Encoder f = backbone + projector, predictor h. forward(views) -> (z, p), lists with one
    (n, D) tensor per view.

    Each view goes through the encoder on its own, so BN normalises over one view of the batch at a
    time, as in SimSiam's and GSG's builder.py (they call the encoder once per view)."""

    def __init__(self, backbone, projector, predictor):
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def encode(self, x):
        return self.projector(self.backbone(x))  # (n, proj_dim), not normalised

    def forward(self, views):
        z = [self.encode(x) for x in views]  # [(n, proj_dim)] per view
        return z, [self.predictor(zv) for zv in z]


def build_model(cfg, size):
    # CIFAR-10 (C.2): torchvision's ResNet-18 (Kaiming init) with the CIFAR stem, not lightly's
    # ResNetGenerator (PyTorch's default init)
    backbone = models.build_model(cfg.arch, image_size=size,
                                  zero_init_residual=cfg.zero_init_residual)
    # C.1/C.2: hidden layers Linear -> BN -> ReLU, output Linear -> BN (no affine, SimSiam's code).
    # The output Linear has no bias (SimSiam's is frozen, and the affine-free BN removes it
    # anyway); lightly's CIFAR projector has biases and an affine last BN.
    projector = models.mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers,
                           last_norm=True)
    # C.1: Linear -> BN -> ReLU -> Linear (with bias, nothing after it): the bottleneck predictor.
    predictor = models.mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, last_norm=False,
                           last_bias=True)
    return SimSiam(backbone, projector, predictor)


def partner_views(views):
    """Alg. 1 `zip(batch, shuffle(batch))` without a second data pipeline: all four views
    [x11, x12, x21, x22] are augmentations of the same image i, and the last two are re-indexed by a
    permutation r of this rank's rows, so x21, x22 become two views of image r(i) (gsg
    main_pretrain.py: images[2][r], images[3][r]). The permutation is drawn per rank from the local
    batch (no collective), so a partner never comes from another GPU; r(i) = i is possible, as in
    the authors' code. Returns (views, r)."""
    x11, x12, x21, x22 = views  # each (n, 3, H, W), row i from image i
    # torch's RNG, reseeded per epoch and rank (bit-exact resume); drawn on the views' device, so
    # the index needs no copy from the host
    r = torch.randperm(x11.shape[0], device=x11.device)
    return [x11, x12, x21[r], x22[r]], r


def simsiam_loss(p, z, stop_grad=True):
    """D(p, z) = -cos(p, sg(z)), averaged over the batch (SimSiam Eq. 1-2). p, z: (n, D) -> scalar,
    dtype of p.

    The stop-gradient is applied here (`z.detach()`), so callers may pass targets that carry a
    graph; stop_grad=False is the ablation of SimSiam's Fig. 2 (the gradient also flows through
    z)."""
    return -F.cosine_similarity(p, z.detach() if stop_grad else z, dim=-1).mean()


def gsg_loss(p11, p12, p21, p22, z11, z12, z21, z22):
    """Guided stop-gradient loss (GSG appendix Alg. 1), vectorised over the batch. All inputs
    (n, D) -> scalar, the mean of l_i over the batch.

    Sample i: image i has views 11, 12 and its partner r(i) views 21, 22. The closest cross-image
    pair is the argmin over d(z11,z21), d(z11,z22), d(z12,z21), d(z12,z22) (Euclidean), the first
    on ties like Alg. 1's if/elif chain. Distances and targets use the z's without gradient (they
    are detached here).
    """
    z11, z12, z21, z22 = (z.detach() for z in (z11, z12, z21, z22))
    d = torch.stack([torch.linalg.vector_norm(a - b, dim=-1)
                     for a, b in ((z11, z21), (z11, z22), (z12, z21), (z12, z22))],
                    dim=1)  # (n, 4), Alg. 1 order
    closest = d.argmin(dim=1)  # (n,); torch.argmin returns the first minimum: the if/elif order
    # closest in {0, 1}: z11 is in the closest pair -> p11 predicts z12; else p12 predicts z11.
    cos1 = torch.where(closest < 2, F.cosine_similarity(p11, z12, dim=-1),
                       F.cosine_similarity(p12, z11, dim=-1))
    # closest in {0, 2}: z21 is in the closest pair -> p21 predicts z22; else p22 predicts z21.
    cos2 = torch.where(closest % 2 == 0, F.cosine_similarity(p21, z22, dim=-1),
                       F.cosine_similarity(p22, z21, dim=-1))
    return -0.5 * (cos1 + cos2).mean()  # "loss.append(0.5 * l)", then the mean over the batch


def view_recipes(cfg, size):
    """App. B.1 / B.2: MoCo v2's recipe for every view (B.2, CIFAR-10: crop 0.08-1, no blur)."""
    return [augment.mocov2_recipe(size, crop_min=cfg.crop_min, blur=cfg.blur)]


@torch.no_grad()
def ema_update(target, online, m):
    """theta_target <- m theta_target + (1 - m) theta_online (BYOL Eq. 1), over parameters only:
    gsg/builder.py updates `parameters()`, and the target's BN statistics come from its own forward
    passes in train mode."""
    optim.ema_(list(target.parameters()), list(online.parameters()), m)


# ============================================ training ============================================

def linear_scaled_lr(cfg):
    return cfg.lr * cfg.batch_size / 256  # the peak lr, by the linear scaling rule (SimSiam Sec. 4)


def epoch_lr(cfg, epoch):
    """SimSiam's adjust_learning_rate: cosine over EPOCHS (constant within an epoch) from the peak,
    no warmup by default; or the peak throughout."""
    if cfg.lr_schedule == "constant":
        return linear_scaled_lr(cfg)
    return schedules.cosine(epoch, cfg.epochs, linear_scaled_lr(cfg),
                            warmup_steps=cfg.warmup_epochs)


def train_one_epoch(model_ddp, view_maker, model, target, loader, optimizer, scaler, cfg, ctx,
                    epoch, step):
    model_ddp.train()
    if target is not None:
        # the authors' momentum encoder is a submodule of the training model: BN on batch statistics
        target.train()
    meter, out_std = log.Meter(), log.Meter()
    progress = log.Progress(loader, epoch, cfg.max_steps_per_epoch, cfg.log_every, cfg.batch_size)
    lr = epoch_lr(cfg, epoch)
    optim.set_lr_wd(optimizer, lr)  # leaves a fixed_lr group (the predictor) alone: param_groups
    for i, (images, _) in enumerate(progress):
        views = view_maker(images)  # 2 or 4 x (n, 3, H, W), on the device
        if cfg.gsg:
            views, _ = partner_views(views)  # [x11, x12, x21, x22]: x21, x22 show image r(i)
        if target is not None:
            # gsg/builder.py BYOL(GSG).forward: the momentum update comes before the target forward.
            # That equals BYOL's update right after the previous optimizer step, except that the
            # last step is never folded in.
            ema_update(target, model, cfg.ema_momentum)
        with optim.autocast(cfg.amp, ctx.device):
            z_online, p = model_ddp(views)  # [(n, D)] per view: online projections, predictions
            if target is None:  # SimSiam: the online projections are the targets
                z = z_online
            else:  # BYOL: the targets and GSG's distances come from the momentum encoder
                with torch.no_grad():
                    z = [target.encode(x) for x in views]
        z, p = [t.float() for t in z], [t.float() for t in p]  # the loss in float32 (normalisation)
        if cfg.gsg:
            loss = gsg_loss(*p, *z)  # p11, p12, p21, p22, z11, z12, z21, z22
        else:  # SimSiam Alg. 1, symmetric
            loss = 0.5 * (simsiam_loss(p[0], z[1], cfg.stop_grad)
                          + simsiam_loss(p[1], z[0], cfg.stop_grad))
        optim.step(loss, optimizer, scaler)
        meter.update(loss, step)
        out_std.update(log.output_std(z[0]), step)  # collapse monitor (SimSiam Fig. 2), on targets
        progress.log(i, step, meter, lr=lr)
        step += 1
    meter.check()
    return step, {"loss": meter.global_avg(), "lr": lr, "out_std": out_std.global_avg(),
                  **log.output_spectrum(z[0]), **progress.stats()}


def param_groups(model, cfg, peak_lr):
    """SGD groups: encoder (backbone + projector) follows the schedule; with fix_pred_lr the
    predictor group is tagged fixed_lr and starts (and stays) at the peak lr (main_simsiam.py
    --fix-pred-lr)."""
    encoder = nn.ModuleList([model.backbone, model.projector])
    groups = optim.param_groups(encoder, cfg.weight_decay, cfg.exclude_bias_norm)
    for g in optim.param_groups(model.predictor, cfg.weight_decay, cfg.exclude_bias_norm):
        groups.append(dict(g, name="predictor_" + g["name"], fixed_lr=cfg.fix_pred_lr, lr=peak_lr))
    return groups


def main():
    # ----- config and distributed setup -----
    cfg = config.parse(Config, description=__doc__.splitlines()[0])
    if not cfg.stop_grad and (cfg.base != "simsiam" or cfg.gsg):
        raise ConfigError("--stop_grad false is SimSiam's ablation: it needs --base simsiam --gsg "
                          "false (BYOL's targets come from a momentum encoder, which has no "
                          "gradient to stop)")
    ctx = dist.setup(cfg.device)
    batch_per_rank = dist.per_rank(cfg.batch_size, ctx.world_size)
    log.start(cfg, ctx)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    # ----- data: App. B.1 / B.2 (view_recipes); 4 independent views per image for GSG -----
    size = data.image_size(cfg)
    channels_last = models.use_channels_last(cfg.arch, ctx.device)
    view_maker = augment.ViewMaker(view_recipes(cfg, size), 4 if cfg.gsg else 2, ctx.device,
                                   cfg.aug_device, cfg.dataset, cfg.compile, channels_last)
    dataset = data.build_dataset(cfg.dataset, cfg.data_dir, "pretrain", view_maker.transform,
                                 cfg.download)
    loader = data.train_loader(dataset, batch_per_rank, ctx, cfg.num_workers, cfg.seed)
    steps_per_epoch = data.steps_per_epoch(loader, cfg.max_steps_per_epoch)
    knn = KNNMonitor(cfg.dataset, cfg.data_dir, size, ctx, num_workers=cfg.num_workers,
                     bank_size=cfg.knn_bank) if cfg.eval_every else None

    # ----- model (and the momentum target for --base byol) -----
    model, model_ddp, note = dist.prepare(build_model(cfg, size), ctx, cfg.sync_bn, cfg.compile,
                                          channels_last)
    target = None
    if cfg.base == "byol":  # copied after DDP has broadcast rank 0's weights; never wrapped in DDP
        # the whole model, where gsg/builder.py copies the encoder: the predictor's copy is unused
        target = copy.deepcopy(model).requires_grad_(False)
    heads = models.count_params(model.projector) + models.count_params(model.predictor)
    print0(f"{note}; base {cfg.base}, gsg {cfg.gsg}; backbone "
           f"{models.count_params(model.backbone) / 1e6:.2f}M params, heads {heads / 1e6:.2f}M; "
           f"{len(dataset)} images, {steps_per_epoch} steps/epoch")

    # ----- optimizer (lr is set every epoch in train_one_epoch) -----
    peak_lr = linear_scaled_lr(cfg)
    optimizer = optim.build_optimizer("sgd", param_groups(model, cfg, peak_lr), lr=peak_lr,
                                      momentum=cfg.momentum)
    scaler = optim.grad_scaler(cfg.amp, ctx.device)
    states = dict(model=model, optimizer=optimizer, scaler=scaler)
    if target is not None:
        states["teacher"] = target

    # ----- resume -----
    start_epoch, step, _ = checkpoint.resume(cfg, **states)

    # ----- epoch loop: train, log, evaluate, checkpoint -----
    for epoch in range(start_epoch, cfg.epochs):
        data.seed_epoch(loader, cfg.seed, epoch, ctx.rank)
        step, row = train_one_epoch(model_ddp, view_maker, model, target, loader, optimizer,
                                    scaler, cfg, ctx, epoch, step)
        if knn and knn.due(epoch, cfg.epochs, cfg.eval_every):
            # the online backbone, as GSG's main_knn.py
            row.update(knn.log_row(model.backbone, temperature=cfg.knn_temperature))
        log.end_epoch(cfg.output_dir, epoch, step, row)
        # GSG evaluates the online encoder (main_knn.py, main_lincls.py)
        checkpoint.save_epoch(ctx, cfg.output_dir, epoch + 1, step, config.to_dict(cfg),
                              cfg.save_every, evaluate="model", **states)

    # ----- cleanup: the online backbone (and the momentum encoder's for --base byol) -----
    checkpoint.export_backbone(ctx, cfg.output_dir, model.backbone, target and target.backbone,
                               "model")
    dist.cleanup()


if __name__ == "__main__":
    config.run(main)
