"""Checkpoints: written atomically, loaded with weights_only=True, resumed automatically from
output_dir.

`last.pt` is a plain dict: the state dicts passed to `save` by name (`model`, `teacher`,
`optimizer`, `scaler`, `loss_state`...), plus `epoch` (the next epoch to run), `step`, `config`,
`format` and `evaluate`: which of `model` and `teacher` the paper behind the script evaluates (what
the eval tools' `--which auto` picks). A file that cannot be read is an error that names it; it is
never overwritten silently.
"""
import os

import torch

from common import config
from common.config import ConfigError
from common.log import print0

FORMAT = 1


def save(path, epoch, step, config, evaluate="model", **states):
    """Atomically write `path`: save to path.tmp, fsync, then rename (a crash leaves the old file
    intact).
    `states` maps names to objects with state_dict() or to plain values. Call on rank 0 only."""
    if evaluate not in states and evaluate != "model":
        raise ValueError(f"evaluate={evaluate!r} names no saved state (have {sorted(states)})")
    blob = {name: obj.state_dict() if hasattr(obj, "state_dict") else obj
            for name, obj in states.items()}
    blob.update(epoch=epoch, step=step, config=config, format=FORMAT, evaluate=evaluate)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path):
    """Read a checkpoint (CPU tensors, weights_only). Raises ConfigError for a missing, corrupt or
    foreign file."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}): it is truncated, "
                          f"corrupt or not a checkpoint of this repository; move it away to start "
                          f"fresh") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a format-{FORMAT} checkpoint of this repository")
    return blob


def resume_path(output_dir, resume):
    """`--resume PATH` if given, else output_dir/last.pt if it exists (auto-resume), else None."""
    if resume:
        return resume
    path = os.path.join(output_dir, "last.pt")
    return path if os.path.exists(path) else None


def resume(cfg, **objects):
    """Auto-resume: load output_dir/last.pt (or --resume PATH) into `objects` (name -> module /
    optimizer / scaler, strictly) and log it. Returns (start epoch, step, the checkpoint dict) or
    (0, 0, {}) for a fresh run.
    Refuses (ConfigError) when a state does not fit, naming the config keys that changed since the
    checkpoint."""
    path = resume_path(cfg.output_dir, cfg.resume)
    if not path:
        return 0, 0, {}
    blob, now = load(path), config.to_dict(cfg)
    changed = {k: (v, now[k]) for k, v in blob["config"].items() if k in now and now[k] != v
               and k not in ("resume", "epochs", "output_dir", "eval_every", "num_workers",
                             "device")}
    for name, obj in objects.items():
        if name not in blob:
            raise ConfigError(f"checkpoint {path} has no '{name}' state; it was written by another "
                              f"script")
        try:
            obj.load_state_dict(blob[name])
        except (RuntimeError, ValueError, KeyError) as e:
            detail = (", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                      or str(e).splitlines()[0][:200])
            raise ConfigError(f"checkpoint {path} does not fit this run ({name}: {detail}); use a "
                              f"new --output_dir or the checkpoint's settings") from None
    print0(f"resumed from {path} at epoch {blob['epoch']}"
           + (f" (changed: {changed})" if changed else ""))
    return blob["epoch"], blob["step"], blob


WHICH = ("auto", "model", "teacher")  # the eval tools' --which choices


def resolve_which(blob, which="auto"):
    """'auto' -> the network the checkpoint's paper evaluates (its `evaluate` entry; 'model' in
    older checkpoints)."""
    return blob.get("evaluate", "model") if which == "auto" else which


def backbone_state(blob, which="auto"):
    """The backbone's state dict from a checkpoint blob (keys `backbone.*` of `model` or `teacher`,
    prefix removed), ready for torchvision's ResNets or timm's ViT. A plain state dict (an exported
    backbone.pt) passes through."""
    if "format" not in blob:
        return blob
    which = resolve_which(blob, which)
    if which not in blob:
        held = sorted(k for k in blob if k in ("model", "teacher"))
        raise ConfigError(f"the checkpoint has no '{which}' weights (it holds {held})")
    state = {k[len("backbone."):]: v for k, v in blob[which].items() if k.startswith("backbone.")}
    if not state:
        raise ConfigError(f"the checkpoint's '{which}' has no backbone.* weights")
    return state


def load_backbone(path, which="auto"):
    """Rebuild the backbone a training script saved in `path` and load the weights of `which`
    (model, teacher or auto: the one the paper evaluates). Returns (backbone, config, the
    resolved which)."""
    from common import data, models  # local: this module stays importable without the model zoo
    blob = load(path)
    cfg = blob["config"]
    backbone = models.build_model(
        cfg["arch"], image_size=cfg["image_size"] or data.DEFAULT_IMAGE_SIZE[cfg["dataset"]],
        patch_size=cfg.get("patch_size", 16), num_heads=cfg.get("num_heads") or None)
    try:
        backbone.load_state_dict(backbone_state(blob, which))
    except RuntimeError as e:
        raise ConfigError(f"the backbone weights in {path} do not fit {cfg['arch']}: "
                          f"{str(e).splitlines()[0]}") from None
    return backbone, cfg, resolve_which(blob, which)


def load_projector(path, which="auto"):
    """The projection head g of a checkpoint (`projector.*` of `model` or `teacher`), rebuilt from
    its weights as common.models.mlp lays it out: Linear, BatchNorm1d (affine or not, as the state
    dict shows), ReLU, ..., Linear (, BatchNorm1d). For probing g(h) instead of h
    (SimCLR Sec. 4.2, Fig. 8). Heads with LayerNorms are refused."""
    blob = load(path)
    which = resolve_which(blob, which)
    state = {k[len("projector."):]: v for k, v in blob.get(which, {}).items()
             if k.startswith("projector.")}
    if not state:
        raise ConfigError(f"the checkpoint's '{which}' has no projector.* weights (no projection "
                          f"head to probe)")
    params = {}  # Sequential index -> {name: tensor}; indices without state are the ReLUs
    for key, value in state.items():
        index, name = key.split(".", 1)
        params.setdefault(int(index), {})[name] = value
    layers = []
    for i in range(max(params) + 1):
        p = params.get(i)
        if p is None:
            layers.append(torch.nn.ReLU())
        elif p.get("weight") is not None and p["weight"].dim() == 2:
            layers.append(torch.nn.Linear(p["weight"].shape[1], p["weight"].shape[0],
                                          bias="bias" in p))
        elif "running_mean" in p:
            layers.append(torch.nn.BatchNorm1d(len(p["running_mean"]), affine="weight" in p))
        else:
            raise ConfigError(f"projector layer {i} of {path} is not a Linear or a BatchNorm1d "
                              f"(LayerNorm heads cannot be probed)")
    head = torch.nn.Sequential(*layers)
    head.load_state_dict(state)
    return head


def save_epoch(ctx, output_dir, epoch, step, config, save_every=0, evaluate="model", **states):
    """End-of-epoch checkpoint: rank 0 writes last.pt atomically (and epoch_XXXX.pt every
    `save_every` epochs), then every rank waits. `epoch` is the number of finished epochs, i.e.
    the epoch a resume starts at; `evaluate` names the state the paper evaluates."""
    if ctx.is_main:
        save(os.path.join(output_dir, "last.pt"), epoch, step, config, evaluate, **states)
        if save_every and epoch % save_every == 0:
            save(os.path.join(output_dir, f"epoch_{epoch:04d}.pt"), epoch, step, config, evaluate,
                 **states)
    torch.distributed.barrier()


def export_backbone(ctx, output_dir, backbone, teacher=None, evaluate="model"):
    """Write backbone.pt (the online / student backbone) and, where there is one,
    teacher_backbone.pt (the EMA teacher's): bare state dicts (torchvision / timm key names),
    atomically, on rank 0. Says which one the paper evaluates (`evaluate`) and, for a ViT, which
    timm call they load into (the head count matters: common/vit.py)."""
    if not ctx.is_main:
        return
    files = {"model": ("backbone.pt", backbone), "teacher": ("teacher_backbone.pt", teacher)}
    for name, module in files.values():
        if module is not None:
            tmp = os.path.join(output_dir, name + ".tmp")
            torch.save(module.state_dict(), tmp)
            os.replace(tmp, os.path.join(output_dir, name))
    name = files[evaluate][0]
    print0(f"{output_dir}/{name} is the backbone the paper evaluates"
           + (f"; it loads into {backbone.timm_call()}" if hasattr(backbone, "timm_call") else ""))
