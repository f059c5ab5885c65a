import random
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

import sdssl
from common import augment, data
from common.config import ConfigError
from helpers import TINY, copy_epoch_1, run_script


def test_cifar_files_are_read_into_memory(process_group, cifar_root):
    train = data.build_dataset("cifar10", cifar_root, "train", None)
    val = data.build_dataset("cifar10", cifar_root, "val", augment.eval_transform(32))
    assert len(train) == 40 and len(val) == 20 and train.images.shape == (40, 32, 32, 3)
    assert train.images.dtype == torch.uint8 and data.num_classes(train) <= 10
    x, y = val[3]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    raw, _ = train[3]  # without a transform: the uint8 image, for the batched augmentation
    assert raw.dtype == torch.uint8 and raw.shape == (32, 32, 3)
    c100 = data.build_dataset("cifar100", cifar_root, "pretrain", None)
    assert len(c100) == 40 and int(c100.labels.max()) < 100


def test_missing_dataset_says_where_and_how(process_group, tmp_path):
    with pytest.raises(ConfigError, match=r"cifar100 not found: looked for .*cifar-100-python; pass --download true"):
        data.build_dataset("cifar100", str(tmp_path), "train", None)
    with pytest.raises(ConfigError, match="no image folder at"):
        data.build_dataset("imagefolder", str(tmp_path), "train", None)
    with pytest.raises(ConfigError, match="unknown dataset"):
        data.build_dataset("emnist", str(tmp_path), "train", None)


def test_stl10_binaries_are_read_upright_with_the_unlabeled_set_for_pretraining(tmp_path, monkeypatch):
    """STL-10's binary files (MSBReg's configs) store each channel column-major: written here so that pixel (row r,
    column c) of the red channel is r, they must come out (N, 96, 96, 3) with that pixel at [r, c, 0]; 'pretrain'
    adds the unlabeled images (label -1, no class of their own), 'val' is the test set. torchvision's md5 check is
    skipped: these files are made up."""
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rows = torch.arange(96, dtype=torch.uint8)[:, None].expand(96, 96)  # red = the row index
    image = torch.stack([rows, rows.T, torch.full((96, 96), 7, dtype=torch.uint8)])  # (3, H, W): green = column
    column_major = image.transpose(1, 2).contiguous()  # each channel's columns one after another

    def write(name, n, labels=None):
        (folder / f"{name}_X.bin").write_bytes(column_major.expand(n, -1, -1, -1).numpy().tobytes())
        if labels is not None:
            (folder / f"{name}_y.bin").write_bytes(bytes(labels))  # 1-based on disk
    write("train", 2, [1, 3])
    write("test", 1, [2])
    write("unlabeled", 3)
    monkeypatch.setattr(data.D.STL10, "_check_integrity", lambda self: True)
    pretrain = data.build_dataset("stl10", str(tmp_path), "pretrain", None)
    assert pretrain.images.shape == (5, 96, 96, 3) and pretrain.labels.tolist() == [0, 2, -1, -1, -1]
    assert pretrain.classes == [0, 2]
    expected = image.permute(1, 2, 0)
    assert all(torch.equal(img, expected) for img in pretrain.images)  # [r, c] = (r, c, 7): upright
    train, val = (data.build_dataset("stl10", str(tmp_path), split, None) for split in ("train", "val"))
    assert len(train) == 2 and val.labels.tolist() == [1]


def test_balanced_subset_keeps_the_first_images_of_each_class():
    """ifacd_distill.py --train_subset (claim 6's 5,000 images): n / C images per class, the first ones in file
    order whatever the seed, and clear errors for an n that does not divide or a class that is too small."""
    labels = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2, 1, 1])
    ds = data.ArrayDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3), labels)
    subset = data.balanced_subset(ds, 6)
    assert subset.labels.tolist() == [2, 0, 0, 1, 2, 1] and subset.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert subset.classes == ds.classes == [0, 1, 2]
    with pytest.raises(ConfigError, match="positive multiple of the 3 classes"):
        data.balanced_subset(ds, 4)
    with pytest.raises(ConfigError, match="some class has fewer than 4"):
        data.balanced_subset(ds, 12)
    with pytest.raises(ConfigError, match="needs an in-memory dataset"):
        data.balanced_subset(torch.utils.data.TensorDataset(labels), 3)


def test_a_failed_download_says_where_to_fetch_and_put_the_files(tmp_path, monkeypatch):
    """--download true with no network (the README's quick start on an offline machine): one
    ConfigError naming the source and the folder the files go in, with or without a process group
    (no process group here: a notebook's build_dataset)."""
    import urllib.error

    def offline(cls):
        class Offline(cls):  # keeps torchvision's url / mirrors
            def __init__(self, *args, **kwargs):
                raise urllib.error.URLError("no network")
        return Offline
    monkeypatch.setattr(data.D, "CIFAR10", offline(data.D.CIFAR10))
    monkeypatch.setattr(data.D, "FashionMNIST", offline(data.D.FashionMNIST))
    root = str(tmp_path)
    with pytest.raises(ConfigError, match=rf"downloading cifar10 into {root} failed \(URLError: .*no network.*\); "
                                          rf"fetch it by hand from https://www.cs.toronto.edu/\S+-python.tar.gz and "
                                          rf"unpack it so that {root}/cifar-10-batches-py holds its files"):
        data.build_dataset("cifar10", root, "pretrain", None, download=True)
    with pytest.raises(ConfigError, match=rf"fetch it by hand from http\S+ and unpack it so that "
                                          rf"{root}/FashionMNIST/raw holds"):
        data.build_dataset("fashion_mnist", root, "train", None, download=True)


def test_class_list_subset(image_folder, tmp_path):
    (tmp_path / "classes.txt").write_text("c3\nc1\n")
    ds = data.build_dataset("imagefolder", image_folder, "train", None, class_list=str(tmp_path / "classes.txt"))
    assert ds.classes == ["c1", "c3"] and len(ds) == 16 and {y for _, y in ds.samples} == {0, 1}
    (tmp_path / "bad.txt").write_text("c1\nn0000\n")
    with pytest.raises(ConfigError, match="not folders of"):
        data.build_dataset("imagefolder", image_folder, "train", None, class_list=str(tmp_path / "bad.txt"))


def test_fake_is_deterministic_and_splits_differ():
    a, b, v = data.fake_set("train"), data.fake_set("train"), data.fake_set("val")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images[:len(v)], v.images)


def test_train_loader_shards_and_drops_last(process_group):
    ds = data.fake_set("val")  # 256 images
    loader = data.train_loader(ds, 100, process_group, 0, seed=0)
    assert len(loader) == 2 and data.steps_per_epoch(loader, 1) == 1 and data.steps_per_epoch(loader, 0) == 2
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        data.train_loader(ds, 512, process_group, 0, seed=0)


def test_augmentation_recipes_produce_views():
    from PIL import Image
    img = Image.fromarray(data.fake_set("train").images[0].numpy())
    t1, t2 = (augment.to_torchvision(r) for r in augment.byol_recipes(32))
    v1, v2 = augment.TwoViews(t1, t2)(img)
    assert v1.shape == v2.shape == (3, 32, 32)
    recipes = [augment.simclr_recipe(24, 0.5, blur=False), augment.mocov2_recipe(16)]
    views = augment.MultiViews([augment.to_torchvision(r) for r in recipes], 4)(img)
    assert [v.shape[-1] for v in views] == [24, 16, 24, 16]
    assert augment.linear_train_transform(32)(img).shape == (3, 32, 32)
    assert augment.eval_transform(224)(img).shape == (3, 224, 224)


# ----- data order: each epoch its own, the same again on resume, each rank its own part -----
# Through train_loader and seed_epoch as every script calls them (CONVENTIONS 10), with a fake
# Context for the rank; then through one script's main(), end to end.

class Drawn(Dataset):
    """Item i is (i, a draw from torch's RNG): the order the sampler gives, and the stream the
    augmentation draws from (in this process, or in the loader's worker)."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return i, torch.rand(())


def fake_ctx(rank, world_size=2):
    return SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"))


def one_epoch(loader, epoch, rank, seed=0):
    """(indices, draws) of everything a rank's loader yields in an epoch after data.seed_epoch."""
    data.seed_epoch(loader, seed, epoch, rank)
    indices, draws = zip(*loader)
    return torch.cat(indices).tolist(), torch.cat(draws)


def test_each_epoch_has_an_order_of_its_own():
    loaders = [data.train_loader(Drawn(), 4, fake_ctx(rank), 0, seed=0) for rank in (0, 1)]
    epochs = [[one_epoch(loader, e, rank) for rank, loader in enumerate(loaders)] for e in range(3)]
    for e, ranks in enumerate(epochs):
        assert sorted(ranks[0][0] + ranks[1][0]) == list(range(32))  # the ranks share the epoch
        for later in epochs[e + 1:]:
            for rank in (0, 1):
                assert ranks[rank][0] != later[rank][0]  # the order
                assert not torch.equal(ranks[rank][1], later[rank][1])  # the augmentation stream


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_resumed_at_its_boundary_is_the_same(workers):
    """A fresh loader (a relaunch) with the global RNGs elsewhere gives epoch 2 exactly as the
    straight run did: the order and the draws, in the process or in a worker (no persistent workers:
    they would keep epoch 0's seed)."""
    straight = data.train_loader(Drawn(), 4, fake_ctx(1), workers, seed=3)
    runs = [one_epoch(straight, e, rank=1, seed=3) for e in range(3)]
    torch.manual_seed(12345), torch.rand(7), random.seed(9)  # whatever came before the relaunch
    resumed = data.train_loader(Drawn(), 4, fake_ctx(1), workers, seed=3)
    order, draws = one_epoch(resumed, 2, rank=1, seed=3)
    assert order == runs[2][0] and torch.equal(draws, runs[2][1])
    assert order != runs[1][0]


def test_each_rank_has_its_own_part_and_stream():
    """Disjoint parts of every epoch, and a different augmentation stream for every (epoch, rank):
    seed + 1000 * epoch + rank collides for no two of them (seed + epoch + rank would)."""
    streams = {}
    for epoch in range(3):
        parts = []
        for rank in (0, 1):
            loader = data.train_loader(Drawn(), 4, fake_ctx(rank), 0, seed=0)
            order, draws = one_epoch(loader, epoch, rank)
            parts.append(set(order))
            streams[epoch, rank] = draws
        assert not parts[0] & parts[1] and len(parts[0]) == len(parts[1]) == 16
    keys = sorted(streams)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not torch.equal(streams[a], streams[b]), (a, b)


def test_the_seed_sets_the_order():
    a, b = (one_epoch(data.train_loader(Drawn(), 4, fake_ctx(0), 0, seed=s), 0, 0, seed=s)
            for s in (0, 1))
    assert a[0] != b[0] and not torch.equal(a[1], b[1])


def test_a_script_sees_a_new_order_each_epoch_and_the_same_on_resume(process_group, image_folder,
                                                                    tmp_path, monkeypatch):
    """sdssl.py's main() (a ViT: the cheapest script) in-process, its sampler and its first views
    recorded: epoch 1 differs from epoch 0, and the epoch-1 checkpoint resumed replays epoch 1."""
    orders, views = [], []

    class RecordingSampler(DistributedSampler):
        def __iter__(self):
            orders.append(list(super().__iter__()))
            return iter(orders[-1])
    real_forward = sdssl.SDSSL.forward

    def forward(model, x):
        views.append(x[0].detach().clone())  # view 1 of the batch
        return real_forward(model, x)
    monkeypatch.setattr(data, "DistributedSampler", RecordingSampler)
    monkeypatch.setattr(sdssl.SDSSL, "forward", forward)

    def run(out):
        run_script("sdssl", [
            "--config", TINY, "--data_dir", image_folder, "--output_dir", out, "--epochs", "2",
            "--max_steps_per_epoch", "1", "--eval_every", "0", "--save_every", "1", "--arch",
            "vit_debug", "--patch_size", "8", "--num_heads", "2", "--isd_hidden_dim", "32",
            "--pred_hidden_dim", "64"])
    run(str(tmp_path / "straight"))
    copy_epoch_1(str(tmp_path / "straight"), str(tmp_path / "resumed"))
    run(str(tmp_path / "resumed"))
    assert len(orders) == len(views) == 3  # epochs 0, 1, then 1 again
    assert orders[0] != orders[1] and orders[2] == orders[1]
    assert not torch.equal(views[0], views[1]) and torch.equal(views[2], views[1])
