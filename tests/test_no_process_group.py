"""Every loss runs as plain PyTorch in a process that never starts a process group (a notebook, a unit test, a
coursework file that copies one loss): it then behaves as world size 1 and equals the value under a 1-process group."""
import json

import pytest
import torch

from helpers import ROOT, run_python

# Each entry: the import, then an expression of fixed inputs (seeded) whose value is printed.
CASES = {
    "simclr_loss": "from simclr import simclr_loss as f; v = f(a, b, 0.5)",
    "mocov3_loss": "from mocov3 import mocov3_loss as f; v = f(a, b, 0.2)",
    "sdssl.contrastive_loss": "from sdssl import contrastive_loss as f; v = f(torch.cat([a, a]), b, 0.2, 2)",
    "sdssl.nt_xent_loss": "from sdssl import nt_xent_loss as f; v = f(torch.cat([a, b]), torch.cat([a, b]), 0.2)",
    "msbreg.singular_value_loss": "from msbreg import singular_value_loss as f; v = f(torch.stack([a, b]))",
    "msbreg_loss": "from msbreg import msbreg_loss as f; v = f(torch.stack([a, b]), torch.stack([b, a]), "
                   "torch.stack([a, a]))[0]",
    "ifacd_loss": "from ifacd_distill import ifacd_loss as f; v = f(torch.stack([a, b], dim=1), 0.07)",
    "ifaclr_loss": "from ifaclr import ifaclr_loss as f; v = f(torch.stack([a, b], dim=1), 0.5)",
}
PROGRAM = """
import json, sys, torch
sys.path.insert(0, {root!r})
torch.manual_seed(0)
a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
out = {{}}
for name, code in {cases!r}.items():
    scope = dict(torch=torch, a=a, b=b)
    exec(code, scope)
    out[name] = float(scope["v"])
out["group"] = torch.distributed.is_initialized()
print(json.dumps(out))
"""


def in_a_fresh_process(tmp_path):
    program = tmp_path / "program.py"
    program.write_text(PROGRAM.format(root=ROOT, cases=CASES))
    out = run_python(program, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_losses_without_a_process_group_equal_world_size_one(process_group, capsys, tmp_path):
    plain = in_a_fresh_process(tmp_path)  # never initialises a process group
    rng = torch.get_rng_state()
    exec(PROGRAM.format(root=ROOT, cases=CASES), {"__name__": "grouped"})  # this process: a 1-process group
    torch.set_rng_state(rng)
    grouped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not plain.pop("group") and grouped.pop("group")
    assert plain.keys() == CASES.keys()
    for name in CASES:
        assert plain[name] == grouped[name], name
