import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval import linear
from eval.knn import KNNMonitor, knn_classify, select_layers


def clusters(n_per_class, classes, dim, seed, spread=0.1):
    centers = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=1) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return F.normalize(x, dim=1), y


def test_knn_on_separable_data():
    train_f, train_y = clusters(20, 5, 16, seed=0)
    test_f, test_y = clusters(7, 5, 16, seed=1)
    correct = knn_classify(train_f, train_y, test_f, test_y, ks=(1, 20, 200), temperature=0.07)
    assert {k: c.tolist() for k, c in correct.items()} == {1: [35, 35], 20: [35, 35], 200: [35, 35]}  # k > 100 is fine


def test_knn_chunking_does_not_change_results():
    train_f, train_y = clusters(10, 4, 8, seed=2, spread=1.0)
    test_f, test_y = clusters(10, 4, 8, seed=3, spread=1.0)
    a = knn_classify(train_f, train_y, test_f, test_y, ks=(5,), chunk=1)
    b = knn_classify(train_f, train_y, test_f, test_y, ks=(5,), chunk=1000)
    assert torch.equal(a[5], b[5])


def test_knn_votes_are_weighted_by_similarity():
    # Two far neighbours of class 0 vs one very close neighbour of class 1: with T small the close one wins.
    train_f = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=1)
    train_y = torch.tensor([1, 0, 0])
    test_f = F.normalize(torch.tensor([[1.0, 0.3]]), dim=1)
    assert int(knn_classify(train_f, train_y, test_f, torch.tensor([1]), ks=(3,), temperature=0.07)[3][0]) == 1
    assert int(knn_classify(train_f, train_y, test_f, torch.tensor([0]), ks=(3,), temperature=100.0)[3][0]) == 1


def test_select_layers():
    from common.config import ConfigError
    from common.models import build_model
    vit = build_model("vit_debug", image_size=32, patch_size=8)
    assert select_layers(vit, "last") is None and select_layers(vit, "all") == [1, 2] and select_layers(vit, "2") == [2]
    with pytest.raises(ConfigError, match="number 1..2"):
        select_layers(vit, "3")
    assert select_layers(build_model("resnet18", image_size=32), "all") == [1, 2, 3, 4]  # torchvision: 4 stages
    assert select_layers(build_model("resnet8"), "all") == [1, 2, 3]  # the CIFAR zoo: 3 stages
    assert select_layers(build_model("vgg8"), "all") == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="needs a ViT or a ResNet"):
        select_layers(nn.Linear(2, 2), "all")


def test_knn_monitor_and_linear_probe_on_image_folder(process_group, image_folder):
    from common.models import build_model
    torch.manual_seed(0)
    vit = build_model("vit_debug", image_size=32, patch_size=8)
    ctx = process_group
    monitor = KNNMonitor("imagefolder", image_folder, 32, ctx, batch_size=16, num_workers=0)
    per_layer = monitor.evaluate(vit, ks=(1, 5), layers=[1, 2])
    assert len(per_layer) == 2 and all(0 <= a <= 100 for r in per_layer for acc in r.values() for a in acc)
    # --knn_bank: that many training images, evenly spaced, as the neighbours (eval_loader: Subset(Indexed(...)))
    n = len(monitor.train.dataset)
    assert n % 4 == 0 and n % 3
    for size, every in ((n // 4, 4), (n // 3, None)):  # the configs' 10,000 of 60,000 divides like n // 4
        bank = KNNMonitor("imagefolder", image_folder, 32, ctx, batch_size=16, num_workers=0, bank_size=size)
        kept = list(bank.train.dataset.dataset.dataset.indices)
        assert len(kept) == size and kept[0] == 0 and kept == sorted(set(kept)) and kept[-1] < n
        assert every is None or kept == list(range(0, n, every))
    assert bank.num_classes == monitor.num_classes
    cfg = linear.Config(mode="fast", epochs=30, batch_size=16, num_workers=0, lr=0.5)
    top1 = linear.linear_eval(vit, "imagefolder", image_folder, 32, ctx, cfg, layers=[1, 2])
    assert len(top1) == 2 and max(t[0] for t in top1) >= 50  # 4 classes with distinct mean colours (chance: 25%)
    full = linear.linear_eval(vit, "imagefolder", image_folder, 32, ctx,
                              linear.Config(mode="full", epochs=2, batch_size=8, num_workers=0))
    assert len(full) == 1


def test_linear_eval_detects_a_changed_backbone():
    model = nn.Linear(2, 2)
    snap = linear._snapshot(model)
    linear.assert_unchanged(model, snap)
    with torch.no_grad():
        model.weight[0, 0] += 1
    with pytest.raises(AssertionError, match="weight changed"):
        linear.assert_unchanged(model, snap)


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_linear_probe_leaves_a_batchnorm_backbone_unchanged(process_group, image_folder, mode):
    """On a ResNet the backbone's BN running statistics are state too: the probe keeps the backbone in eval mode,
    and the final check would see a forward pass in train mode."""
    from common.models import build_model
    torch.manual_seed(0)
    backbone = build_model("resnet18", image_size=32)
    before = linear._snapshot(backbone)
    cfg = linear.Config(mode=mode, epochs=1, batch_size=8, num_workers=0)
    linear.linear_eval(backbone, "imagefolder", image_folder, 32, process_group, cfg)  # asserts unchanged itself
    linear.assert_unchanged(backbone, before)
    backbone.train()(torch.randn(4, 3, 32, 32))  # what a probe that forgot eval() would do
    with pytest.raises(AssertionError, match="running_mean changed"):
        linear.assert_unchanged(backbone, before)


def test_head_probe_rebuilds_the_projection_head(process_group, tmp_path, monkeypatch):
    """eval.frozen --head true probes g(h) (SimCLR Fig. 8): the head rebuilt from the checkpoint's weights computes
    exactly what the trained model computed, and a LayerNorm head is refused with a clear error."""
    import json

    import simclr
    from common import checkpoint, config, dist
    from common.config import ConfigError
    from eval import frozen
    cfg = config.parse(simclr.Config, ["--arch", "resnet8", "--dataset", "fake", "--proj_hidden_dim", "16",
                                       "--proj_dim", "8", "--proj_layers", "3"])
    torch.manual_seed(0)
    model = simclr.build_model(cfg, 32)
    model.train()(torch.randn(16, 3, 32, 32))  # BN running statistics that are not the init's
    path = str(tmp_path / "last.pt")
    checkpoint.save(path, 1, 2, config.to_dict(cfg), model=model)
    backbone, _, _ = checkpoint.load_backbone(path)
    head = checkpoint.load_projector(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(head.eval()(backbone.eval()(x)), model.eval()(x))
    monkeypatch.setattr(dist, "cleanup", lambda: None)  # keep the session's process group
    frozen.main(["--checkpoint", path, "--head", "true", "--linear_epochs", "1", "--k", "5",
                 "--json", str(tmp_path / "head.json")])
    assert {"knn_top1_k5", "linear_top1"} <= set(json.load(open(tmp_path / "head.json")))
    import ifaclr
    ln = config.parse(ifaclr.Config, ["--arch", "vit_mini", "--patch_size", "7", "--head", "slides",
                                      "--head_norm", "ln"])
    checkpoint.save(path, 1, 2, config.to_dict(ln), model=ifaclr.build_model(ln, 28))
    with pytest.raises(ConfigError, match="LayerNorm heads cannot be probed"):
        checkpoint.load_projector(path)
