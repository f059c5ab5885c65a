"""common/checkpoint.py: a write cut short (the process killed inside torch.save, or before the rename) leaves the
previous last.pt as it was and loadable, and the exported CIFAR-stem ResNet-18 backbone loads into torchvision's
resnet18 without renaming (the tests about ResNet-18 itself; the scripts' torchrun runs train resnet8)."""
import os

import pytest
import torch
import torch.nn as nn
import torchvision

from common import checkpoint, config, dist
from helpers import assert_same_tensors


class Killed(BaseException):
    """What SIGKILL does to a write, as far as the file system sees it: it stops at some byte."""


def test_a_write_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    old, new = nn.Linear(3, 2), nn.Linear(3, 2)
    checkpoint.save(path, 1, 2, {"epochs": 4}, model=old)
    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):  # writes part of the file, then the process is gone
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise Killed
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(Killed):
        checkpoint.save(path, 2, 4, {"epochs": 4}, model=new)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.path.exists(path + ".tmp")  # the torn write is the temporary file, never last.pt
    blob = checkpoint.load(path)
    assert blob["epoch"] == 1 and blob["step"] == 2
    assert_same_tensors(blob["model"], old.state_dict())
    assert checkpoint.resume_path(str(tmp_path), "") == path  # a resume reads last.pt, not the torn .tmp

    def dies_before_rename(src, dst):
        raise Killed
    monkeypatch.setattr(os, "replace", dies_before_rename)
    with pytest.raises(Killed):
        checkpoint.save(path, 2, 4, {"epochs": 4}, model=new)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    checkpoint.save(path, 2, 4, {"epochs": 4}, model=new)  # the next save replaces the leftover .tmp
    assert checkpoint.load(path)["epoch"] == 2 and not os.path.exists(path + ".tmp")
    assert_same_tensors(checkpoint.load(path)["model"], new.state_dict())


@pytest.mark.parametrize("script", ["simclr", "byol"])
def test_exported_cifar_resnet18_loads_into_torchvision(script, tmp_path):
    """backbone.pt as the script writes it (checkpoint.export_backbone of its model's backbone, ResNet-18 with the
    CIFAR stem) loads into torchvision's resnet18 with the same stem: only fc is missing, nothing unexpected."""
    module = __import__(script)
    cfg = config.parse(module.Config, ["--arch", "resnet18", "--image_size", "32", "--proj_hidden_dim", "64",
                                       "--proj_dim", "32"] + (["--pred_hidden_dim", "64"] if script == "byol" else []))
    model = module.build_model(cfg, 32)
    checkpoint.export_backbone(dist.Context(0, 0, 1, torch.device("cpu")), str(tmp_path), model.backbone)
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert_same_tensors(exported, model.backbone.state_dict())
    tv = torchvision.models.resnet18()
    tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    missing, unexpected = tv.load_state_dict(exported, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]


def test_each_unusable_checkpoint_gets_its_own_message(tmp_path):
    """What the eval tools and a resume say about a file they cannot use: missing, foreign, written by another script,
    holding no such network, no backbone or projector, or a backbone of another architecture."""
    from common.models import build_model
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(config.ConfigError, match="checkpoint .*nope.pt does not exist"):
        checkpoint.load(missing)
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"state_dict": {}}, foreign)  # another repository's checkpoint
    with pytest.raises(config.ConfigError, match="foreign.pt is not a format-1 checkpoint of this repository"):
        checkpoint.load(foreign)
    import simclr
    path = str(tmp_path / "last.pt")
    run = config.parse(simclr.Config, ["--arch", "resnet18", "--image_size", "32", "--dataset", "fake",
                                       "--output_dir", str(tmp_path)])
    cfg = config.to_dict(run)
    checkpoint.save(path, 1, 5, cfg, model=nn.Module())  # no backbone.* weights, no projector.*
    with pytest.raises(config.ConfigError, match="has no 'teacher' state; it was written by another script"):
        checkpoint.resume(run, teacher=nn.Linear(2, 2))
    blob = checkpoint.load(path)
    with pytest.raises(config.ConfigError, match=r"has no 'teacher' weights \(it holds \['model'\]\)"):
        checkpoint.backbone_state(blob, "teacher")
    with pytest.raises(config.ConfigError, match="'model' has no backbone.\\* weights"):
        checkpoint.backbone_state(blob)
    with pytest.raises(config.ConfigError, match="'model' has no projector.\\* weights"):
        checkpoint.load_projector(path)
    model = nn.Module()
    model.backbone = build_model("resnet8")  # a CIFAR-zoo net saved, resnet18 claimed by the config
    checkpoint.save(path, 1, 5, cfg, model=model)
    with pytest.raises(config.ConfigError, match="the backbone weights in .*last.pt do not fit resnet18: "):
        checkpoint.load_backbone(path)
