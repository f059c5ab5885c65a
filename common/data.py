"""Datasets and loaders: cifar10, cifar100, stl10, fashion_mnist, mnist, imagenet, imagefolder
(data_dir/train + data_dir/val), fake.

The small sets are downloaded through torchvision (`--download true`; rank 0 downloads while the
others wait) and read into memory as uint8 tensors (`ArrayDataset`); folders go through
torchvision's ImageFolder. A missing dataset is an error that says where we looked and how to get
the data.

Fashion-MNIST and MNIST (60k train, 10k test, 28x28 grey) are read from their four standard idx
files, gzipped or not, either flat in data_dir (Debian's dataset-fashion-mnist: --data_dir
/usr/share/datasets/fashion-mnist) or in torchvision's layout (data_dir/FashionMNIST/raw,
data_dir/MNIST/raw). They stay at their native 28 px (every model here pools adaptively, and a
2-core CPU is where they are meant to run: 32 px would cost 30% more for border pixels), grey
replicated to three channels so the RGB recipes and models apply unchanged.
"""
import gzip
import os
import pickle
import random

import torch
import torch.distributed as tdist
import torchvision.datasets as D
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.config import ConfigError

DATASETS = ("cifar10", "cifar100", "stl10", "fashion_mnist", "mnist", "imagenet", "imagefolder",
            "fake")
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "fashion_mnist": 28, "mnist": 28,
                      "imagenet": 224, "imagefolder": 224, "fake": 32}
# torchvision's download folder (data_dir/X/raw)
IDX_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# `fake`: random images, 10 classes, for smoke runs and bench.py
FAKE_SIZES = {"train": 1024, "val": 256, "side": 32}


def image_size(cfg):
    """The crop size: `cfg.image_size`, or the dataset's native size when it is 0."""
    return cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.dataset]


def _check_name(name):
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'; choose one of {list(DATASETS)}")


class ArrayDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, H, W, 3) with integer labels (-1 = unlabeled).
    Items are (transform(PIL image), label), or (uint8 (H, W, 3) tensor, label) without a
    transform: the batched on-device augmentation (common/batch_augment.py) takes those."""

    def __init__(self, images, labels, transform=None, classes=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = classes or sorted({int(y) for y in labels.tolist() if y >= 0})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.transform is None:
            return self.images[i], int(self.labels[i])
        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.labels[i])


def _download(name, root, present, folder):
    """Rank 0 (or the only process: no process group is needed) fetches the archive with
    torchvision, which checks its md5, while the other ranks wait; `present` says whether the files
    are there already, `folder` (under root) is where they land."""
    if (not tdist.is_initialized() or tdist.get_rank() == 0) and not present():
        cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "stl10": D.STL10,
               "fashion_mnist": D.FashionMNIST, "mnist": D.MNIST}[name]
        try:
            cls(root, download=True)
        except Exception as e:  # no network, disk full, ...: one clear line instead of a traceback
            source = getattr(cls, "url", None) or cls.mirrors[0]
            raise ConfigError(f"downloading {name} into {root} failed ({type(e).__name__}: {e}); "
                              f"fetch it by hand from {source} and unpack it so that "
                              f"{os.path.join(root, folder)} holds its files") from None
    if tdist.is_initialized():
        tdist.barrier()


def _read_cifar(path, files, label_key):
    images, labels = [], []
    for name in files:
        with open(os.path.join(path, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
                      .permute(0, 2, 3, 1))
        labels.append(torch.as_tensor(batch[label_key]))
    return torch.cat(images).contiguous(), torch.cat(labels)


def _small_set(name, root, split, transform, download):
    """CIFAR-10/100 (pickled batches) or STL-10 (binary files), read into memory. split: pretrain,
    train or val."""
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
              "stl10": "stl10_binary"}[name]
    path = os.path.join(root, folder)
    if download:
        _download(name, root, lambda: os.path.isdir(path), folder)
    try:
        if name == "cifar10":
            files = [f"data_batch_{i}" for i in range(1, 6)] if split != "val" else ["test_batch"]
            images, labels = _read_cifar(path, files, b"labels")
        elif name == "cifar100":
            images, labels = _read_cifar(path, ["train" if split != "val" else "test"],
                                         b"fine_labels")
        else:
            parts = {"pretrain": ["train", "unlabeled"], "train": ["train"], "val": ["test"]}[split]
            sets = [D.STL10(root, split=p) for p in parts]
            images = torch.cat([torch.as_tensor(s.data).permute(0, 2, 3, 1)
                                for s in sets]).contiguous()
            labels = torch.cat([torch.as_tensor(s.labels, dtype=torch.int64) for s in sets])
    except (OSError, RuntimeError, pickle.UnpicklingError, KeyError):
        raise ConfigError(f"{name} not found: looked for {os.path.abspath(path)}; pass --download "
                          f"true to fetch it with torchvision, or point --data_dir at the folder "
                          f"that contains {folder}") from None
    return ArrayDataset(images, labels.long(), transform)


def _idx_path(root, name, stem):
    """The first of root/stem[.gz], root/<torchvision folder>/raw/stem[.gz] that exists, or None."""
    for folder in (root, os.path.join(root, IDX_FOLDER[name], "raw")):
        for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
            if os.path.isfile(path):
                return path
    return None


def _read_idx(path):
    """An idx file (LeCun's format: magic with the dtype and rank, big-endian sizes, then the data)
    as a tensor."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:  # 0x08 = unsigned bytes
        raise ConfigError(f"{path} is not an idx file of unsigned bytes")
    rank = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * rank:]), dtype=torch.uint8)
    if data.numel() != torch.Size(shape).numel():
        raise ConfigError(f"{path} is truncated: the header promises {shape}, the file holds "
                          f"{data.numel()} bytes")
    return data.view(shape)


def _idx_set(name, root, split, transform, download):
    """Fashion-MNIST / MNIST from the four idx files (train = the 60k training images, val = the 10k
    test set), grey replicated to RGB: uint8 (N, 28, 28, 3)."""
    files = IDX_FILES["val" if split == "val" else "train"]
    if download:
        _download(name, root, lambda: all(_idx_path(root, name, f) for f in files),
                  os.path.join(IDX_FOLDER[name], "raw"))
    paths = [_idx_path(root, name, f) for f in files]
    if None in paths:
        hint = (" (or: apt-get install dataset-fashion-mnist, then --data_dir "
                "/usr/share/datasets/fashion-mnist)" if name == "fashion_mnist" else "")
        where = os.path.abspath(root)
        raise ConfigError(f"{name} not found: looked for {files[0]} and {files[1]} (.gz or not) in "
                          f"{where} and {os.path.join(where, IDX_FOLDER[name], 'raw')}; pass "
                          f"--download true to fetch them with torchvision{hint}")
    images, labels = (_read_idx(p) for p in paths)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ConfigError(f"{paths[0]} and {paths[1]} do not hold images (N, H, W) and their N "
                          f"labels")
    return ArrayDataset(images[..., None].expand(-1, -1, -1, 3).contiguous(), labels.long(),
                        transform, classes=list(range(10)))


class ClassSubsetFolder(D.ImageFolder):
    """An ImageFolder restricted to the classes listed in a text file, one folder name per line
    (ImageNet-100)."""

    def __init__(self, root, class_list, transform=None):
        with open(class_list) as f:
            self.keep = sorted(line.split()[0] for line in f if line.strip())
        super().__init__(root, transform=transform)

    def find_classes(self, directory):  # torchvision's documented extension point
        missing = [c for c in self.keep if not os.path.isdir(os.path.join(directory, c))]
        if missing:
            raise ConfigError(f"{len(missing)} classes of the class list are not folders of "
                              f"{directory} (first: {missing[0]})")
        return self.keep, {c: i for i, c in enumerate(self.keep)}


def _folder_set(root, split, transform, class_list=""):
    path = os.path.join(root, "val" if split == "val" else "train")
    if not os.path.isdir(path):
        raise ConfigError(f"no image folder at {os.path.abspath(path)}: imagenet/imagefolder "
                          f"expect data_dir/train/<class>/<image> and data_dir/val/<class>/<image> "
                          f"(ImageNet cannot be downloaded automatically: get ILSVRC-2012 from "
                          f"image-net.org and point --data_dir at it)")
    if class_list and not os.path.isfile(class_list):
        raise ConfigError(f"class list {class_list} does not exist")
    try:
        if class_list:
            return ClassSubsetFolder(path, class_list, transform)
        return D.ImageFolder(path, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"cannot read image folder {path}: {e}") from None


def fake_set(split, transform=None):
    """Random uint8 images with random labels (10 classes), the same on every call; train and val
    differ."""
    n, size = FAKE_SIZES["val" if split == "val" else "train"], FAKE_SIZES["side"]
    g = torch.Generator().manual_seed(1 if split == "val" else 0)
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.randint(0, 10, (n,), generator=g), transform,
                        classes=list(range(10)))


def build_dataset(name, root, split, transform, download=False, class_list=""):
    """split: 'pretrain' (unlabeled training images: STL-10 adds its 100k unlabeled set), 'train'
    (labeled training images, for k-NN and linear evaluation) or 'val'. class_list:
    imagefolder/imagenet class subset."""
    _check_name(name)
    if name == "fake":
        return fake_set(split, transform)
    if name in ("imagenet", "imagefolder"):
        return _folder_set(root, split, transform, class_list)
    if name in IDX_FOLDER:
        return _idx_set(name, root, split, transform, download)
    return _small_set(name, root, split, transform, download)


def balanced_subset(dataset, n):
    """The first n / C images of each of the C classes, in file order (the same images for every
    seed and run): a data-limited training set. Only for in-memory datasets (ArrayDataset)."""
    if not isinstance(dataset, ArrayDataset):
        raise ConfigError("train_subset needs an in-memory dataset (cifar10/100, stl10, "
                          "fashion_mnist, mnist, fake)")
    per_class = n // len(dataset.classes)
    if per_class < 1 or n % len(dataset.classes):
        raise ConfigError(f"train_subset={n} must be a positive multiple of the "
                          f"{len(dataset.classes)} classes")
    keep = torch.cat([torch.nonzero(dataset.labels == c).flatten()[:per_class]
                      for c in range(len(dataset.classes))])
    if len(keep) < n:
        raise ConfigError(f"train_subset={n}: some class has fewer than {per_class} training "
                          f"images")
    keep = keep.sort().values
    return ArrayDataset(dataset.images[keep], dataset.labels[keep], dataset.transform,
                        dataset.classes)


def num_classes(dataset):
    """Number of classes of a labeled dataset built by build_dataset."""
    return len(dataset.classes)


class Indexed(Dataset):
    """Wraps a dataset so that items are (x, y, index): evaluation gathers features by sample
    index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def _workers(n):
    """At most one worker per available core: more only adds start-up time and torch's
    oversubscription warning."""
    return min(n, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def train_loader(dataset, batch_size_per_rank, ctx, num_workers, seed):
    """Shuffled, each rank its own part, incomplete batches dropped. Call
    `loader.sampler.set_epoch(e)` per epoch."""
    if len(dataset) < batch_size_per_rank * ctx.world_size:
        raise ConfigError(f"the dataset has {len(dataset)} images, fewer than one global batch "
                          f"({batch_size_per_rank * ctx.world_size}); lower --batch_size")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    # No persistent workers: they would keep the first epoch's RNG seed and break bit-exact resume.
    return DataLoader(dataset, batch_size=batch_size_per_rank, sampler=sampler,
                      num_workers=_workers(num_workers), pin_memory=ctx.device.type == "cuda",
                      drop_last=True)


def eval_loader(dataset, batch_size, ctx, num_workers):
    """Rank r sees samples r, r+W, r+2W, ... in order, without padding, so gathered counts are
    exact.
    Items are (x, y, index)."""
    shard = torch.utils.data.Subset(Indexed(dataset),
                                    range(ctx.rank, len(dataset), ctx.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False,
                      num_workers=_workers(num_workers), pin_memory=ctx.device.type == "cuda")


def seed_epoch(loader, seed, epoch, rank):
    """Reseed torch and `random` with seed + 1000*epoch + rank and set the sampler's epoch. Every
    rank gets its own augmentation stream, and a run resumed at an epoch boundary is bit-exact
    without storing RNG state."""
    torch.manual_seed(seed + 1000 * epoch + rank)
    random.seed(seed + 1000 * epoch + rank)
    loader.sampler.set_epoch(epoch)


def steps_per_epoch(loader, max_steps):
    """Optimizer steps per epoch: the loader's length, capped by max_steps_per_epoch (0 = no
    cap)."""
    return min(len(loader), max_steps) if max_steps > 0 else len(loader)
