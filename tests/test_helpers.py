"""tests/helpers.py: HostSyncCounter counts exactly the ops that make a GPU wait for the host; spawn_ranks and
run_python start processes as torchrun and python would."""
import json

import pytest
import torch

from helpers import HostSyncCounter

x = torch.linspace(-1.0, 1.0, 8)


def count(fn):
    with HostSyncCounter() as sync:
        fn()
    return sync


def if_positive():
    if x.sum() > 0:  # bool(tensor)
        return 1
    return 0


def set_masked():
    y = x.clone()
    y[y > 0] = 0.0  # index_put_ with a boolean mask
    return y


@pytest.mark.parametrize("fn", [
    lambda: x.sum().item(),
    lambda: float(x[0]),
    lambda: int(x.argmax()),
    if_positive,
    lambda: f"{x.mean():.3f}",
    lambda: x[x > 0],
    set_masked,
    lambda: x.nonzero(),
    lambda: torch.where(x > 0),
    lambda: x.masked_select(x > 0),
    lambda: x.unique(),
    lambda: torch.bincount(torch.arange(4)),
    lambda: torch.arange(3).repeat_interleave(torch.arange(3)),
    lambda: x.tolist(),
    lambda: x.cpu(),
    lambda: x.numpy(),
    lambda: str(x),
    lambda: torch.tensor([1.0, 2.0], device=x.device),
    lambda: torch.equal(x, x),
], ids=["item", "float", "int", "if", "format", "mask_index", "mask_assign", "nonzero",
        "where_1arg", "masked_select", "unique", "bincount", "repeat_interleave", "tolist", "cpu",
        "numpy", "print", "tensor_to_device", "equal"])
def test_each_synchronising_op_counts_once(fn):
    sync = count(fn)
    assert sync.count == 1, sync.report()


@pytest.mark.parametrize("fn", [
    lambda: (x * 2 + 1).relu().exp(),  # elementwise
    lambda: torch.where(x > 0, x, 0.0),
    lambda: x.masked_fill(x > 0, 0.0),
    lambda: x[torch.arange(3)],  # integer indices: the shape is known
    lambda: x.sort().values[:4].sum(),
    lambda: torch.arange(3).repeat_interleave(torch.tensor(2), output_size=6),
    lambda: x.repeat_interleave(2),
    lambda: torch.nonzero_static(x > 0, size=4),
    lambda: torch.tensor([1.0, 2.0]),  # host data that stays on the host
    lambda: (x.shape[0], x.dim(), x.numel()),
], ids=["elementwise", "where_3arg", "masked_fill", "int_index", "sort", "repeat_output_size",
        "repeat_int", "nonzero_static", "host_tensor", "shapes"])
def test_ops_without_synchronisation_count_zero(fn):
    sync = count(fn)
    assert sync.count == 0, sync.report()


def test_total_ops_report_and_backward():
    """Every aten op is counted once, backward included; the report names the caller's line; a
    counter entered twice adds up."""
    w = torch.ones(8, requires_grad=True)
    with HostSyncCounter() as sync:
        loss = (w * x).sum()
        loss.backward()
    assert sync.count == 0 and sync.ops["aten.mul.Tensor"] >= 2  # forward and backward
    assert sync.total_ops == sum(sync.ops.values()) > 3
    with sync:
        x.sum().item()
    with sync:
        x[x > 0]
    assert sync.count == 2
    report = sync.report()
    assert "2 host synchronisation(s)" in report and "test_helpers.py:" in report
    assert "_local_scalar_dense" not in report and "value read on the host" in report


@pytest.mark.e2e
def test_spawn_ranks_stops_the_others_when_a_rank_fails(tmp_path):
    """helpers.spawn_ranks, the 2-rank launch of the tests: every rank gets torchrun's environment, and a rank
    that fails ends the launch at once with its exit code (the other would wait in a collective)."""
    import time
    from helpers import spawn_ranks
    script = tmp_path / "ranks.py"
    script.write_text("import os, sys, time\nprint(os.environ['RANK'], os.environ['WORLD_SIZE'], "
                      "os.environ['LOCAL_WORLD_SIZE'])\nif os.environ['RANK'] == sys.argv[1]: sys.exit(3)\n"
                      "time.sleep(0.2 if sys.argv[1] == 'none' else 60)\n")
    ok = spawn_ranks([str(script), "none"], 2, timeout=30)
    assert ok.returncode == 0 and ok.stdout == "0 2 2\n"
    start = time.monotonic()
    failed = spawn_ranks([str(script), "1"], 2, timeout=30)
    assert failed.returncode == 3 and time.monotonic() - start < 10


@pytest.mark.e2e
def test_a_forked_process_runs_a_script_as_a_fresh_interpreter_would(tmp_path):
    """helpers.run_python (a process forked from the fork server): the script runs as __main__ with its own argv,
    its folder first on sys.path and tests/ off it, the repository importable, OMP_NUM_THREADS obeyed; an
    uncaught exception exits with status 1 and its traceback on stderr. (`-m module`: tests/eval/test_plot.py,
    test_command_line_error_is_one_line.)"""
    from helpers import ROOT, TESTS, run_python
    script = tmp_path / "probe.py"
    script.write_text("import json, os, sys, torch\nimport common\n"
                      "print(json.dumps([__name__, sys.argv, sys.path[0], sys.path, torch.get_num_threads()]))\n"
                      "if sys.argv[1] == 'raise': raise ValueError('planted')\n")
    out = run_python(script, "quiet")
    name, argv, first, path, threads = json.loads(out.stdout)
    assert out.returncode == 0 and name == "__main__" and argv == [str(script), "quiet"] and threads == 1
    assert first == str(tmp_path) and ROOT in path and not any(p.startswith(TESTS) for p in path)
    failed = run_python(script, "raise")
    assert failed.returncode == 1 and "ValueError: planted" in failed.stderr and "Traceback" in failed.stderr
