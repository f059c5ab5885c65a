"""Every shipped YAML config parses against its script's Config (no unknown keys, right types); the evaluation
protocols in configs/eval/ against eval.knn's or eval.linear's (by their name's prefix). Subfolders are parsed too
(configs/ifacd_distill/repdistiller/): the script is the first folder under configs/."""
import glob
import importlib
import os

import pytest

from common import config
from helpers import ROOT

SCRIPTS = {"simclr": "simclr", "mocov3": "mocov3", "byol": "byol", "simsiam_gsg": "simsiam_gsg", "sdssl": "sdssl",
           "msbreg": "msbreg", "ifacd_distill": "ifacd_distill", "ifaclr": "ifaclr"}
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*", "**", "*.yaml"), recursive=True)
                 if os.sep + "claims" + os.sep not in p)  # configs/claims/: tests/runners/test_claims.py, with each arm


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_parses(path):
    method = os.path.relpath(path, os.path.join(ROOT, "configs")).split(os.sep)[0]
    if method == "eval":
        module = importlib.import_module("eval." + os.path.basename(path).split("_")[0])  # knn_*.yaml, linear_*.yaml
    else:
        module = importlib.import_module(SCRIPTS[method])
    cfg = config.parse(module.Config, ["--config", path])
    assert cfg.config == path
