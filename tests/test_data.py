import pytest
import torch

from common import augment, data
from common.config import ConfigError


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
