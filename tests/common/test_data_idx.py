"""common/data.py: Fashion-MNIST / MNIST from their idx files (both layouts, gzipped or not) and their clear errors
(the other datasets, loaders and data order: test_data.py)."""
import os

import pytest
import torch

from common import data
from common.config import ConfigError
from helpers import write_fashion


@pytest.mark.parametrize("layout, compress", [(False, True), (True, False)], ids=["flat-gz", "torchvision-raw"])
def test_idx_files_are_read_as_rgb_uint8(tmp_path, layout, compress):
    root = write_fashion(str(tmp_path), torchvision_layout=layout, compress=compress)
    train = data.build_dataset("fashion_mnist", root, "train", None)
    val = data.build_dataset("fashion_mnist", root, "val", None)
    assert train.images.shape == (64, 28, 28, 3) and val.images.shape == (32, 28, 28, 3)
    assert train.images.dtype == torch.uint8 and torch.equal(train.images[..., 0], train.images[..., 2])
    assert train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and data.num_classes(train) == 10
    assert data.build_dataset("fashion_mnist", root, "pretrain", None).images.shape[0] == 64
    x, y = train[3]
    assert x.shape == (28, 28, 3) and y == 3
    assert data.DEFAULT_IMAGE_SIZE["fashion_mnist"] == 28


def test_missing_or_broken_idx_files_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="fashion_mnist not found: looked for train-images-idx3-ubyte and "
                                          "train-labels-idx1-ubyte .* dataset-fashion-mnist"):
        data.build_dataset("fashion_mnist", str(tmp_path), "train", None)
    root = write_fashion(str(tmp_path / "ok"), compress=False)
    path = os.path.join(root, "train-images-idx3-ubyte")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ConfigError, match="truncated"):
        data.build_dataset("fashion_mnist", root, "train", None)
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(ConfigError, match="not an idx file"):
        data.build_dataset("fashion_mnist", root, "train", None)
