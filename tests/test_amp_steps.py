"""Every method of every script takes a training step under bf16 and fp16 autocast (#25 item 2; the fp16
cases beyond one or two per script run with -m slow).

optim.autocast and optim.grad_scaler are CUDA-only in the scripts; here they are switched on for the
CPU, whose autocast raises the same dtype errors (a module run outside autocast on a half-precision
activation: "Input type (BFloat16) and bias type (float)"). One step of 4 fake images per case, in
this process."""
import os
import sys

import pytest
import torch

import byol
import ifacd_distill
import ifaclr
import mocov3
import msbreg
import sdssl
import simclr
import simsiam_gsg
from common import dist, optim

VIT = ["--arch", "vit_debug", "--patch_size", "8", "--num_heads", "2"]
SMALL = ["--proj_hidden_dim", "16", "--proj_dim", "8"]
SSL_CASES = {
    "simclr": (simclr, ["--arch", "resnet8", *SMALL]),
    "mocov3": (mocov3, ["--arch", "resnet8", *SMALL, "--pred_hidden_dim", "16"]),
    "mocov3-vit": (mocov3, [*VIT, *SMALL, "--pred_hidden_dim", "16"]),
    "byol": (byol, ["--arch", "resnet8", *SMALL, "--pred_hidden_dim", "16"]),
    "simsiam": (simsiam_gsg, ["--arch", "resnet8", *SMALL, "--pred_hidden_dim", "8", "--gsg",
                              "false"]),
    "simsiam-gsg": (simsiam_gsg, ["--arch", "resnet8", *SMALL, "--pred_hidden_dim", "8"]),
    "byol-gsg": (simsiam_gsg, ["--arch", "resnet8", *SMALL, "--pred_hidden_dim", "8", "--base",
                               "byol"]),
    **{f"sdssl-{f}": (sdssl, [*VIT, *SMALL, "--framework", f, "--isd_hidden_dim", "16",
                              "--pred_hidden_dim", "16"]) for f in ("mocov3", "byol", "simclr")},
    "msbreg": (msbreg, ["--arch", "resnet8", *SMALL, "--num_views", "2"]),
    **{f"ifaclr-{m}": (ifaclr, [*VIT, *SMALL, "--method", m]) for m in ("lwclr", "simlwclr")},
}
pytestmark = pytest.mark.sweep  # every method of every script
RUN = ["--dataset", "fake", "--device", "cpu", "--epochs", "1", "--max_steps_per_epoch", "1",
       "--batch_size", "4", "--num_workers", "0", "--eval_every", "0", "--log_every", "1"]


@pytest.fixture
def cpu_amp(monkeypatch):
    """The scripts' autocast and GradScaler, enabled on the CPU; dist.cleanup kept from ending the
    session's group."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    monkeypatch.setattr(optim, "autocast", lambda amp, device: torch.autocast(
        "cpu", dtype=dtypes.get(amp, torch.float32), enabled=amp != "none"))
    monkeypatch.setattr(optim, "grad_scaler", lambda amp, device: torch.amp.GradScaler(
        "cpu", enabled=amp == "fp16"))
    monkeypatch.setattr(dist, "cleanup", lambda: None)


def run(module, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *args])
    module.main()


# bf16 for every case; fp16 (the same autocast code plus the GradScaler) in the default run for one
# or two cases per script, the rest marked slow: their fp16 backward has no fast CPU kernel (2-4 s a
# step) and their code differs from their bf16 case only in the dtype.
FP16_DEFAULT = {"simclr", "mocov3", "byol", "simsiam-gsg", "sdssl-mocov3", "msbreg",
                "ifaclr-simlwclr", "kd", "crd", "factor"}


def amp_cases(names):
    return [pytest.param(n, amp, marks=[] if amp == "bf16" or n in FP16_DEFAULT
                         else [pytest.mark.slow]) for n in names for amp in ("bf16", "fp16")]


@pytest.mark.parametrize("case, amp", amp_cases(sorted(SSL_CASES)))
def test_ssl_step_under_autocast(process_group, cpu_amp, tmp_path, monkeypatch, case, amp):
    module, flags = SSL_CASES[case]
    run(module, [*RUN, *flags, "--amp", amp, "--output_dir", str(tmp_path)], monkeypatch)
    assert os.path.exists(tmp_path / "last.pt")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A resnet8 teacher trained for one step in float32 (the students below load it)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    mp = pytest.MonkeyPatch()
    mp.setattr(dist, "cleanup", lambda: None)
    try:
        dist.setup("cpu")
        run(ifacd_distill, [*RUN, "--distill", "none", "--student", "resnet8", "--output_dir", out],
            mp)
    finally:
        mp.undo()
    return os.path.join(out, "last.pt")


@pytest.mark.parametrize("method, amp", amp_cases(m for m in ifacd_distill.METHODS if m != "none"))
def test_distillation_step_under_autocast(process_group, cpu_amp, teacher, tmp_path, monkeypatch,
                                          method, amp):
    """Each method's main loop, and the init stage of AB, FT and FSP (their connectors and
    paraphraser)."""
    student = "resnet8x4" if method == "abound" else "resnet8"  # AB's connectors: real convolutions
    run(ifacd_distill, [*RUN, "--distill", method, "--teacher", "resnet8", "--student", student,
                        "--teacher_ckpt", teacher, "--init_epochs", "1", "--crd_negatives", "16",
                        "--amp", amp, "--output_dir", str(tmp_path)], monkeypatch)
    assert os.path.exists(tmp_path / "last.pt")
