"""Two-node launch on one machine: two single-process torchrun "nodes" that meet through a rendezvous train to the
same weights as one node with two processes (`--standalone --nproc_per_node 2`).

Both launch forms the README gives are run: the c10d rendezvous (`--rdzv_backend c10d --rdzv_endpoint HOST:PORT`,
identical commands on every node; torchrun ignores --node_rank there and hands out ranks itself) and the static one
(`--master_addr HOST --master_port PORT --node_rank N`, the form cluster schedulers fill in). The nodes share one
output_dir, as nodes on a shared filesystem do: only global rank 0 writes last.pt and log.jsonl, and every rank
reads last.pt when it resumes.

The weights are compared with torch.equal, not a tolerance: both launches have world size 2, the same rank -> data
shard and seed mapping and one OMP thread per process, and an all-reduce over two ranks adds one pair of numbers per
element, which floating point does exactly commutatively; so nothing depends on how the processes were started, and
any difference is a real launch bug (a rank that trained on other data, or an extra or missing rank).
"""
import os
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, assert_same_tensors, env, load_ckpt, read_log, tiny_args

pytestmark = pytest.mark.slow  # about 3 torchrun launches (5 processes): a minute or two on 2 busy cores

SCRIPT = os.path.join(ROOT, "simclr.py")  # the cheapest script: resnet8 of tests/tiny.yaml, no teacher
EXTRA = ["--epochs", "1", "--eval_every", "0"]  # 2 steps at global batch 8 (4 per rank): one optimizer state too


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(*flags):
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def run_nodes(commands, timeout=600):
    """Start every command at once (one per node), wait for all; on a failure or a timeout, stop the rest and show
    each node's output."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:  # only our own children, by their handles
                p.kill()
                p.communicate()
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), "\n".join(f"--- node {i} (exit {c}):\n{out[-3000:]}"
                                                for i, (c, out) in enumerate(zip(codes, outputs)))
    return outputs


@pytest.fixture(scope="module")
def one_node(image_folder, tmp_path_factory):
    """The reference: one node, two processes."""
    out = str(tmp_path_factory.mktemp("one_node"))
    run_nodes([torchrun("--standalone", "--nproc_per_node", "2", SCRIPT, *tiny_args(image_folder, out, *EXTRA))])
    return out


@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_train_like_one_node_with_two_processes(image_folder, one_node, tmp_path, rendezvous):
    out, port = str(tmp_path / "two_nodes"), free_port()
    if rendezvous == "c10d":  # the same command on both nodes; the job id keeps other jobs on that port apart
        where = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "test_multinode"]
    else:  # node 0 hosts the store at --master_addr:--master_port and gets global rank 0
        where = ["--master_addr", "localhost", "--master_port", str(port)]
    nodes = [torchrun("--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", *where, SCRIPT,
                      *tiny_args(image_folder, out, *EXTRA)) for n in (0, 1)]
    run_nodes(nodes)
    two, one = load_ckpt(out), load_ckpt(one_node)
    assert two["config"]["batch_size"] == one["config"]["batch_size"] == 8  # the global batch, split 4 + 4
    assert two["step"] == one["step"] == 2
    assert_same_tensors(two["model"], one["model"])  # torch.equal on every weight and BN buffer
    assert_same_tensors(two["optimizer"]["state"], one["optimizer"]["state"])  # the LARS/SGD momentum too
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(one_node)]  # all-reduced over 2 ranks
