"""Shared fixtures: a tiny generated image folder, a 1-process group for in-process tests, and launch helpers.

Nothing here needs a GPU or the network.
"""
import gzip
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
sys.path.insert(0, ROOT)


def write_image_folder(root, classes=4, per_class=8, size=32, seed=0):
    """root/{train,val}/c<k>/<i>.png: random 32x32 RGB images, each class with its own mean colour (so k-NN and
    linear probes have something to find)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    tints = torch.rand(classes, 3, generator=g) * 160
    for split in ("train", "val"):
        for c, tint in enumerate(tints):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(per_class):
                x = (tint + torch.rand(size, size, 3, generator=g) * 95).to(torch.uint8).numpy()
                Image.fromarray(x).save(os.path.join(root, split, f"c{c}", f"{i}.png"))
    return root


def write_cifar(root, name="cifar10", train=40, test=20, seed=0):
    """Tiny CIFAR-10/100 in the original pickled format (the files torchvision downloads), random pixels."""
    import pickle
    g = torch.Generator().manual_seed(seed)
    classes = 10 if name == "cifar10" else 100
    folder = os.path.join(root, "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    for f in files:
        n = test if "test" in f else (train // 5 if name == "cifar10" else train)
        batch = {b"data": torch.randint(0, 256, (n, 3 * 32 * 32), generator=g, dtype=torch.uint8).numpy(),
                 key: torch.randint(0, classes, (n,), generator=g).tolist()}
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(batch, fh)
    return root


def write_idx(path, tensor, compress):
    """LeCun's idx format: 0, 0, dtype 0x08 (ubyte), rank, big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, tensor.dim()]) + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    with (gzip.open if compress else open)(path + (".gz" if compress else ""), "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def write_fashion(root, train=64, test=32, torchvision_layout=False, compress=True, seed=0):
    """Tiny Fashion-MNIST: 10 classes of 28x28 grey images, each class a brighter band at its own height."""
    g = torch.Generator().manual_seed(seed)
    folder = os.path.join(root, "FashionMNIST", "raw") if torchvision_layout else root
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for i, y in enumerate(labels.tolist()):
            images[i, 2 * y:2 * y + 8] += 150
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels.to(torch.uint8), compress)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A data_dir holding tiny cifar10 (40 train / 20 test) and cifar100 (40 / 20) files."""
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CPU forwards: one thread is several times faster than two on a shared 2-core machine
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in a test module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def process_group():
    """A 1-process gloo group in the test process (losses call torch.distributed.get_rank())."""
    from common import dist
    return dist.setup("cpu")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def launch(script, args, nproc=2, timeout=600, check=True):
    """Run `script` under torchrun with nproc CPU ranks (or plain python with nproc=0). Returns CompletedProcess."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    out = subprocess.run(cmd + [os.path.join(ROOT, script)] + [str(a) for a in args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def tiny_args(data_dir, output_dir, *extra):
    return ["--config", TINY, "--data_dir", data_dir, "--output_dir", output_dir, *extra]


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(output_dir, name="last.pt"):
    return torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, path=""):
    """Recursively torch.equal every tensor of two checkpoint blobs (state dicts, optimizer states)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor {path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")
