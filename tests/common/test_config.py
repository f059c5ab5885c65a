import dataclasses
from dataclasses import dataclass

import pytest
import yaml

from common import config
from common.config import ConfigError, arg


@dataclass(frozen=True)
class Cfg:
    lr: float = arg(0.3, "base lr")
    epochs: int = arg(100, "epochs")
    name: str = arg("resnet18", "arch", choices=("resnet18", "resnet50"))
    sync_bn: bool = arg(True, "SyncBN")
    ks: list = arg([20, 200], "k values")
    config: str = arg("", "yaml")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_flags_precedence(tmp_path):
    assert config.parse(Cfg, []) == Cfg()
    path = write(tmp_path, "lr: 1e-3\nepochs: 5\nks: [1, 2]\n")  # PyYAML reads 1e-3 as a string
    c = config.parse(Cfg, ["--config", path])
    assert c.lr == 1e-3 and isinstance(c.lr, float) and c.epochs == 5 and c.ks == [1, 2]
    c = config.parse(Cfg, ["--config", path, "--epochs", "7", "--ks", "3"])
    assert c.epochs == 7 and c.lr == 1e-3 and c.ks == [3]


def test_a_yaml_value_a_flag_replaces_is_not_checked(tmp_path):
    """A preset's value outside the script's choices is no error when a flag replaces it (tests/tiny.yaml's
    ResNet under ifaclr.py --arch vit_debug); unreplaced, it still is."""
    path = write(tmp_path, "name: vgg8\nepochs: 5\n")
    assert config.parse(Cfg, ["--config", path, "--name", "resnet50"]).name == "resnet50"
    with pytest.raises(ConfigError, match="name='vgg8' is not one of"):
        config.parse(Cfg, ["--config", path])
    with pytest.raises(ConfigError, match="unknown key 'nme'"):  # unknown keys are still errors
        config.parse(Cfg, ["--config", write(tmp_path, "nme: x\n"), "--name", "resnet50"])


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.parse(Cfg, []).lr = 1.0


@pytest.mark.parametrize("text, message", [
    ("lrr: 0.1\n", "unknown key 'lrr'.*did you mean lr"),
    ("epochs: 2.5\n", "epochs must be of type int"),
    ("epochs: true\n", "epochs must be of type int"),
    ("sync_bn: 1\n", "sync_bn must be true or false"),
    ("name: resnet19\n", "name='resnet19' is not one of"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lr: [1\n", "not valid YAML"),
])
def test_yaml_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(Cfg, ["--config", write(tmp_path, text)])


@pytest.mark.parametrize("flags, message", [
    (["--lr", "abc"], "lr must be of type float"),
    (["--sync_bn", "yes"], "sync_bn must be true or false"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--name", "vgg"], "is not one of"),
    (["--config", "/nonexistent.yaml"], "cannot read config file"),
])
def test_flag_errors(flags, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(Cfg, flags)


@pytest.mark.parametrize("flags", [["--epoch", "1"], ["--sync", "false"], ["--l", "0.1"]])
def test_abbreviated_flags_are_errors_naming_the_flag(flags):
    """No prefix matching: `--epoch 1` is not --epochs (argparse's allow_abbrev default took it)."""
    with pytest.raises(ConfigError, match=f"unrecognized arguments: {flags[0]} "):
        config.parse(Cfg, flags)


def test_full_flags_still_parse_in_both_spellings():
    assert config.parse(Cfg, ["--epochs", "1"]).epochs == 1
    assert config.parse(Cfg, ["--epochs=2", "--lr=0.5"]) == Cfg(epochs=2, lr=0.5)


def test_bools_parse_strictly():
    assert config.parse(Cfg, ["--sync_bn", "false"]).sync_bn is False
    assert config.parse(Cfg, ["--sync_bn", "True"]).sync_bn is True


def test_written_yaml_round_trips(tmp_path):
    c = config.parse(Cfg, ["--lr", "0.05", "--ks", "5", "10"])
    config.write_yaml(c, str(tmp_path / "out.yaml"))
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["lr"] == 0.05
    again = config.parse(Cfg, ["--config", str(tmp_path / "out.yaml")])
    assert again == dataclasses.replace(c, config=str(tmp_path / "out.yaml"))
