"""What can be proven on the CPU before a GPU run (#25): --device auto refuses to put several
processes per node on the CPU without being asked, the training steps force no host
synchronisation, and the foreach EMA updates equal the per-tensor ones bit for bit."""
import pytest
import torch

from common import dist
from common.config import ConfigError


def test_device_auto_refuses_many_processes_per_node_without_cuda(monkeypatch):
    """torchrun --nproc_per_node=8 with a torch that sees no GPU must not become 8 gloo processes on
    the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="8 processes per node but .* no CUDA.*--device cpu"):
        dist.setup("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: the CPU is a fine default
    assert dist.setup("auto").device.type == "cpu"


def ema_pairs():
    """(script, its ema_update, a trained network, its EMA copy) for every script with a teacher."""
    import copy

    import byol
    import mocov3
    import msbreg
    import sdssl
    import simsiam_gsg
    from common import config
    out = []
    small = ["--arch", "resnet8", "--proj_hidden_dim", "16", "--proj_dim", "8"]
    for module, flags in ((mocov3, small), (byol, small), (msbreg, small), (simsiam_gsg, small),
                          (sdssl, ["--arch", "vit_debug", "--patch_size", "8", "--proj_hidden_dim",
                                   "16", "--proj_dim", "8", "--isd_hidden_dim", "16",
                                   "--pred_hidden_dim", "16"])):
        cfg = config.parse(module.Config, flags)
        torch.manual_seed(0)
        model = module.build_student(cfg, 32) if module is sdssl else module.build_model(cfg, 32)
        target = sdssl.Teacher(model) if module is sdssl else copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # the online network has moved away from the target
        out.append((module.__name__, module.ema_update, model, target))
    return out


@pytest.mark.parametrize("m", [0.996, 0.5, 1.0])
def test_foreach_ema_equals_the_per_tensor_update_bit_for_bit(m):
    import copy
    for name, ema_update, model, target in ema_pairs():
        ours, reference = copy.deepcopy(target), copy.deepcopy(target)
        online = dict(model.named_parameters())
        with torch.no_grad():
            if name == "simsiam_gsg":  # zipped in order, as gsg/builder.py
                pairs = zip(reference.parameters(), model.parameters())
            else:
                pairs = ((p, online[n]) for n, p in reference.named_parameters())
            for p, o in pairs:
                p.mul_(m).add_(o, alpha=1.0 - m)
        ema_update(ours, model, m)
        for (n, a), b in zip(ours.named_parameters(), reference.parameters()):
            assert torch.equal(a, b), (name, n)


SYNC_CASES = {  # the scripts whose step must not wait for the host (#25 item 4), tiny settings
    "simclr": ["--arch", "resnet8"],
    "byol": ["--arch", "resnet8", "--pred_hidden_dim", "16"],
    "mocov3": ["--arch", "resnet8", "--pred_hidden_dim", "16"],
    "msbreg": ["--arch", "resnet8", "--num_views", "4"],
    "msbreg-byol": ["--arch", "resnet8", "--num_views", "2", "--centroid", "none"],  # cross-view
    "simsiam_gsg": ["--arch", "resnet8", "--pred_hidden_dim", "8"],  # GSG: 4 views, partner shuffle
    "simsiam_gsg-byol": ["--arch", "resnet8", "--pred_hidden_dim", "8", "--base", "byol"],
}


@pytest.mark.sweep
@pytest.mark.parametrize("case", sorted(SYNC_CASES))
def test_training_steps_force_no_host_synchronisation(process_group, tmp_path, monkeypatch, case):
    """Counted on the CPU with tests/helpers.py's HostSyncCounter around each step's body (the
    loader's fetch excluded: on a GPU it runs in the workers): the steps that print no log line
    make none. The first step fills the augmentation's device caches; the last logs (meter.check, a
    sync by design)."""
    import importlib
    import sys

    from common import batch_augment, log
    from helpers import HostSyncCounter
    module = importlib.import_module(case.split("-")[0])
    counters, real_iter = [], log.Progress.__iter__

    def counted(self):
        for batch in real_iter(self):
            counter = HostSyncCounter()
            with counter:
                yield batch
            counters.append(counter)
    monkeypatch.setattr(log.Progress, "__iter__", counted)
    monkeypatch.setattr(batch_augment, "CPU_SUBSETS", False)  # the GPU's path of the augmentation
    monkeypatch.setattr(dist, "cleanup", lambda: None)
    monkeypatch.setattr(sys, "argv", [case + ".py", "--dataset", "fake", "--device", "cpu",
                                      "--epochs", "1", "--max_steps_per_epoch", "4", "--batch_size",
                                      "8", "--num_workers", "0", "--eval_every", "0",
                                      "--log_every", "1000", "--aug_device", "gpu",
                                      "--proj_hidden_dim", "16", "--proj_dim", "8", "--output_dir",
                                      str(tmp_path), *SYNC_CASES[case]])
    module.main()
    assert len(counters) == 4
    for counter in counters[1:3]:
        assert counter.count == 0, counter.report()


def test_crd_reads_its_normaliser_once():
    """CRD's Z is fixed at the first batch; later steps must not read it back from the device (a
    sync per step), and a loaded state (a resumed run's Z, or a fresh one) is read again."""
    import distill_losses
    from helpers import HostSyncCounter
    memory = distill_losses.CRDMemory(64, 8, 0.5)
    e = torch.rand(4, 17)
    memory.fix_normalisers(e, e)  # the first batch fixes Z (one read)
    fixed = memory.z.clone()
    with HostSyncCounter() as counter:
        z = memory.fix_normalisers(2 * e, 2 * e)
    assert counter.count == 0, counter.report()
    assert torch.equal(z, fixed)
    memory.load_state_dict(distill_losses.CRDMemory(64, 8, 0.5).state_dict())  # not fixed yet
    assert not torch.equal(memory.fix_normalisers(2 * e, 2 * e), fixed)


def test_fp32_means_tf32_matmuls_and_convolutions():
    """--amp none on a GPU: TF32 products in matmuls and convolutions alike (common/dist.py
    `tf32`)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        dist.tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_gsg_draws_its_partner_permutation_on_the_views_device():
    """A permutation drawn on the CPU indexes GPU views through a copy from the host at every step
    (invisible to a CPU count): the views' device, here "meta", must be the permutation's."""
    from simsiam_gsg import partner_views
    views = [torch.empty(6, 3, 4, 4, device="meta") for _ in range(4)]
    shuffled, r = partner_views(views)
    assert r.device.type == "meta" and all(v.device.type == "meta" for v in shuffled)


@pytest.mark.e2e  # starts scripts/gpu_report.py in its own process
def test_gpu_report_runs_in_tiny_mode_on_the_cpu(tmp_path):
    """scripts/gpu_report.py, the first-contact command, at toy sizes: every section fills in, the
    --tiny smoke cases take their 3 steps, resume is bit-exact on the CPU."""
    import json
    import os

    from helpers import ROOT, run_python
    out = run_python(os.path.join(ROOT, "scripts", "gpu_report.py"), "--out", tmp_path, "--tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    sections = ["environment", "simclr_step", "smoke", "resume", "augmentation", "sdssl_ratio",
                "precision", "host_syncs"]
    assert all(name in report and "error" not in report[name] for name in sections), report
    failed = {name: r for name, r in report["smoke"].items() if not r["ok"]}
    assert not failed and len(report["smoke"]) == 3 + 3, failed  # --tiny: 3 SSL cases, 3 distillation
    assert report["resume"]["bit_exact"] and report["sdssl_ratio"]["ratio"] > 0  # a timing
    assert "# GPU report" in open(tmp_path / "report.md").read()
