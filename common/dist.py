"""Distributed setup and the few collectives SSL losses need.

Always launched the same way: `torchrun --standalone --nproc_per_node=N script.py` (N = 1 is fine).
Without the torchrun environment a 1-process group is started, so `python script.py` works and no
code branches on "distributed or not". nccl + cuda:LOCAL_RANK on GPUs, gloo on the CPU.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.config import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup(device="auto"):
    """Join (or create) the process group and pick this rank's device. `device`: auto, cuda or
    cpu."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use --device cpu (or auto)")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "auto" and not torch.cuda.is_available() and per_node > 1:
        # several processes per node are meant for several GPUs: silently training on the CPU would
        # hide the cause (a torch wheel built for a newer CUDA than the driver, or an empty
        # CUDA_VISIBLE_DEVICES)
        raise ConfigError(f"{per_node} processes per node but torch sees no CUDA GPU (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda}: check the "
                          f"driver and CUDA_VISIBLE_DEVICES); pass --device cpu to train on the "
                          f"CPU on purpose")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        tf32()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:  # launched by torchrun
            device_id = torch.device("cuda", local_rank) if use_cuda else None
            dist.init_process_group(backend, device_id=device_id)
        else:  # plain `python script.py`: an in-memory store, no port to pick
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(rank, local_rank, world_size, device)


def tf32():
    """What `--amp none` means on a GPU: float32 storage, TF32 (10-bit mantissa) products in both
    matmuls and convolutions on Ampere and later. PyTorch's defaults differ (TF32 convolutions but
    full-precision matmuls since 1.12), so "fp32" meant different things for ResNets and ViTs; the
    authors' A100 runs (SDSSL; PyTorch 1.7-1.11) had TF32 in both. bf16 autocast is the default."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank(batch_size, world_size):
    """The per-rank share of a global batch; the global batch must be positive and divide evenly."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if batch_size % world_size:
        raise ConfigError(f"batch_size={batch_size} does not divide across {world_size} ranks; "
                          f"use a multiple of {world_size}")
    return batch_size // world_size


def world_size():
    """The number of ranks; 1 when no process group was started (a loss called from a notebook or a
    unit test)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's rank; 0 when no process group was started."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient w.r.t. our slice back to us (sum over
    ranks)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # each rank's loss put gradient on every slice; add them up
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x):
    """(n, ...) on every rank -> (world*n, ...) in rank order; gradients flow back to every rank's
    x."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x):
    """(n, ...) on every rank -> (world*n, ...) in rank order, no gradient (targets, keys,
    features)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def gather_uneven(x):
    """Like gather, but ranks may hold different numbers of rows (evaluation shards)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather(n).tolist()
    padded = torch.zeros((max(sizes),) + x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    return torch.cat([part[:s] for part, s in zip(gather(padded).split(max(sizes)), sizes)])


def all_reduce_sum(x):
    """Sum a tensor over ranks (no gradient; for counts and meters)."""
    x = x.clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def average_gradients(params):
    """Average the gradients of `params` over ranks in place: what DDP does, for modules trained
    outside it."""
    if world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world_size()


def maybe_sync_bn(model, enabled, ctx):
    """SyncBN only on CUDA: under gloo on the CPU DDP refuses SyncBatchNorm layers. Returns (model,
    message)."""
    if not enabled:
        return model, "SyncBN off"
    if ctx.device.type != "cuda":
        return model, ("SyncBN requested but skipped on the CPU (gloo does not support it); BN "
                       "statistics are per rank")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), "SyncBN on"


def ddp(model, ctx):
    """Wrap for training. Forward through the wrapper; EMA, eval and state_dict use the plain
    `model`."""
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def prepare(model, ctx, sync_bn, compile=False, channels_last=False):
    """Everything between building a model and training it: to the device (channels_last for conv
    nets on CUDA), SyncBN (CUDA only), DDP, then torch.compile if asked. Returns (model,
    model_ddp, message): `model` is the plain module (EMA teachers, evaluation and state_dict use
    it: keys have no `module.` / `_orig_mod.` prefix) and `model_ddp` is what the training step
    calls."""
    layout = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(ctx.device, memory_format=layout)
    model, message = maybe_sync_bn(model, sync_bn, ctx)
    model_ddp = ddp(model, ctx)
    if compile:
        model_ddp = torch.compile(model_ddp)
        message += "; torch.compile on (the first steps are slow while it compiles)"
    return model, model_ddp, message


def broadcast_buffers(module, src=0):
    """Copy rank src's buffers (BN running statistics) to every rank: EMA teachers live outside DDP,
    so theirs drift apart; evaluate them with one rank's."""
    if world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=src)
