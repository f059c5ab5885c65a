"""What the test files share (conftest.py holds only fixtures): paths, the tiny data sets the fixtures write, launching
a script (torchrun, or its main() in this process), reading what a run wrote, the 2-rank gloo pool, the loop
references of the losses used by more than one test file, and HostSyncCounter.

Test files import from here (`from helpers import ...`: conftest.py puts tests/ on sys.path), never from each other.
"""
import collections
import contextlib
import datetime
import gzip
import importlib
import importlib.util
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TINY = os.path.join(TESTS, "tiny.yaml")
for _path in (ROOT, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)


# ------------------------------------------ tiny data (no downloads) ------------------------------------------

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


# ------------------------------------- launching a script, reading its run -------------------------------------

def env():
    """The environment of every process a test starts: one OMP thread per process, the repository importable."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def launch(script, args, nproc=2, timeout=600, check=True, torchrun=False):
    """Run `script` as nproc CPU ranks (one plain process with nproc=0). Returns a CompletedProcess (rank 0's
    stdout, every rank's stderr). The ranks are started as torchrun starts them (spawn_ranks); torchrun=True
    starts them through torchrun itself, whose agent and fresh interpreters cost about 4 s more on 2 cores: the
    tests mark every launch `e2e`."""
    argv = [os.path.join(ROOT, script)] + [str(a) for a in args]
    if not torchrun:
        out = spawn_ranks(argv, nproc, timeout)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        out = subprocess.run(cmd + argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def forkserver():
    """multiprocessing's fork server, which imports the third-party modules every script imports, once, and runs
    nothing else (no thread pool for a fork to inherit): the ranks of spawn_ranks and the workers of GlooPool are
    forked from it, instead of fresh interpreters that spend about 2 s each on these imports. Where there is no
    fork server (Windows), spawn: the same processes, each importing for itself."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "numpy", "yaml", "PIL.Image"])
    return ctx


def spawn_ranks(argv, nproc, timeout):
    """`python argv` as nproc processes with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT: all that common.dist reads); nproc=0: one process without them.
    Each process is forked from forkserver() and runs the script as __main__ with its own argv, environment,
    working directory, sys.path, stdout and stderr, as a fresh interpreter would. As torchrun does, a rank that
    fails stops the others (they would wait in a collective); the return code is the failed rank's."""
    ctx = forkserver()
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    folder = tempfile.mkdtemp(prefix="ranks_")
    logs = [(os.path.join(folder, f"{r}.out"), os.path.join(folder, f"{r}.err")) for r in range(max(nproc, 1))]
    ranks = [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(nproc)] or [{}]
    procs = [ctx.Process(target=_run_as_main, args=(argv, dict(env(), **extra), out, err))
             for extra, (out, err) in zip(ranks, logs)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.exitcode is None for p in procs) and all(p.exitcode in (None, 0) for p in procs):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.05)
        code = next((c for c in (p.exitcode for p in procs) if c), 0)
    finally:
        for p in procs:
            p.kill()
            p.join()
    text = []
    for out, err in logs:
        with open(out) as o, open(err) as e:
            text.append((o.read(), e.read()))
    shutil.rmtree(folder, ignore_errors=True)
    return subprocess.CompletedProcess(argv, code, text[0][0], "".join(err for _, err in text))


def run_python(*argv, timeout=600):
    """`python argv` (a script path, or "-m", module) as one process forked from forkserver(): a process that
    never started a process group, with the tests' environment; returns its CompletedProcess."""
    return spawn_ranks([str(a) for a in argv], 0, timeout)


def _run_as_main(argv, environ, out, err):
    """A forked process doing what `python argv` does in a fresh interpreter. multiprocessing turns SystemExit
    and an uncaught exception (its traceback on stderr) into the exit code, as Python does."""
    import atexit
    import runpy
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))  # the fork server read the variable before it was set
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(ROOT)
    module = argv[1] if argv[0] == "-m" else None
    sys.argv = list(argv[1:] if module else argv)
    first = ROOT if module else os.path.dirname(argv[0])  # what python puts first on sys.path
    sys.path[:] = [first, ROOT] + [p for p in sys.path if p not in ("", ROOT) and not p.startswith(TESTS)]
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # a forked process ends with os._exit, which skips them


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


def copy_epoch_1(straight, resumed):
    """resumed/last.pt := straight/epoch_0001.pt (a run's checkpoint after its first epoch), to resume from."""
    os.makedirs(resumed, exist_ok=True)
    shutil.copy(os.path.join(straight, "epoch_0001.pt"), os.path.join(resumed, "last.pt"))


def run_script(name, args):
    """`name`.main() in this process, sys.argv = [name.py, *args], in the caller's process group (the session's
    1-process group, or the pool's 2 ranks), which the script's final dist.cleanup() leaves alive. Returns what it
    printed (rank 0 prints; the others return '')."""
    from common import dist
    module = importlib.import_module(name)
    out, argv, cleanup = io.StringIO(), sys.argv, dist.cleanup
    sys.argv, dist.cleanup = [name + ".py", *map(str, args)], lambda: None
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv, dist.cleanup = argv, cleanup
    return out.getvalue()


class InProcess:
    """Stands in for the `subprocess` module of scripts/runs.py (monkeypatch.setattr(runs, "subprocess", InProcess)):
    each command a table runner launches, `python script.py ...` or `python -m eval.frozen ...`, runs in this process
    through its `__main__` block, in the caller's process group (the session's 1-process group), its output where the
    runner sends it. Everything else the runner does (planning, skipping finished runs, timing, records, tables) runs
    unchanged: only the interpreter per run is gone. torchrun commands (nproc > 0) are refused."""
    STDOUT, PIPE, CalledProcessError, CompletedProcess = (subprocess.STDOUT, subprocess.PIPE,
                                                          subprocess.CalledProcessError, subprocess.CompletedProcess)

    @staticmethod
    def run(cmd, cwd=None, check=False, env=None, stdout=None, stderr=None, **kwargs):
        import runpy
        import warnings
        from common import dist
        assert cmd[0] == sys.executable and cmd[1:3] != ["-m", "torch.distributed.run"], cmd
        module, path, args = (cmd[2], None, cmd[3:]) if cmd[1] == "-m" else (None, cmd[1], cmd[2:])
        saved, code = (sys.argv, os.getcwd(), dist.cleanup), 0
        try:
            sys.argv, dist.cleanup = [path or module, *args], lambda: None
            os.chdir(cwd or os.getcwd())
            with contextlib.ExitStack() as stack:
                if hasattr(stdout, "write"):  # a log file
                    stack.enter_context(contextlib.redirect_stdout(stdout))
                    if stderr == subprocess.STDOUT:
                        stack.enter_context(contextlib.redirect_stderr(stdout))
                try:
                    if module:
                        with warnings.catch_warnings():  # "found in sys.modules ... prior to execution": expected
                            warnings.simplefilter("ignore", RuntimeWarning)
                            runpy.run_module(module, run_name="__main__", alter_sys=True)
                    else:
                        runpy.run_path(path, run_name="__main__")
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            sys.argv, dist.cleanup = saved[0], saved[2]
            os.chdir(saved[1])
        if check and code:
            raise subprocess.CalledProcessError(code, cmd)
        return subprocess.CompletedProcess(cmd, code)


# ------------------------------------------- the 2-rank gloo pool -------------------------------------------

class GlooPool:
    """Worker processes joined in one gloo group (2 ranks), started once per session, on first use: the "2 ranks
    == 1 process" checks and the 2-rank runs of a script's main() run in them instead of an interpreter (or two)
    per test (the idea of lightly's tests/ddp_helpers.py).

    pool.run(fn, *args) calls fn(*args) on every rank at once and returns the ranks' results in rank order. fn is a
    module-level function (sent by its module's name and file); inside it common.dist.setup("cpu") returns this
    rank's Context (RANK, LOCAL_RANK and WORLD_SIZE are set as torchrun sets them), torch runs one thread, and
    common.dist.cleanup() is a no-op: the group outlives each call. Results travel through torch.save. An exception
    on a rank, a dead worker or a call past `timeout` stops every worker (the next call starts fresh ones, so a
    half-finished collective cannot leak into it) and fails the test with each rank's traceback."""

    def __init__(self, world_size=2):
        self.world_size, self.procs, self.conns, self.store = world_size, [], [], None

    def start(self):
        ctx = forkserver()
        self.store = tempfile.mkdtemp(prefix="gloo_pool_")
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_pool_worker, args=(rank, self.world_size, os.path.join(self.store, "store"),
                                                          child), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def run(self, fn, *args, timeout=900):
        if not self.procs:
            self.start()
        module = sys.modules[fn.__module__]
        task = pickle.dumps(((fn.__module__, getattr(module, "__file__", None), fn.__qualname__), args))
        for conn in self.conns:
            conn.send_bytes(task)
        results, errors, pending = [None] * self.world_size, [], dict(enumerate(self.conns))
        deadline = time.monotonic() + timeout
        while pending and not errors:
            ready = multiprocessing.connection.wait(list(pending.values()), max(0.0, deadline - time.monotonic()))
            if not ready:
                errors.append(f"ranks {sorted(pending)}: no result after {timeout} s")
            for rank in [r for r, c in pending.items() if c in ready]:
                try:
                    status, payload = pickle.loads(pending.pop(rank).recv_bytes())
                except (EOFError, OSError):
                    status, payload = "error", "the worker died"
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank}: {payload}")
        if errors:
            self.close()
            raise AssertionError(f"{fn.__qualname__} failed on the gloo pool:\n" + "\n".join(errors))
        return results

    def close(self):
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps(None))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():  # our own worker, by its handle
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)
        self.procs, self.conns, self.store = [], [], None


def _resolve(module_name, path, qualname):
    """The function a pool task names: its module by name (tests/ and its folders are on sys.path), else by file."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn


def _pool_worker(rank, world_size, store, conn):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): bit-exact against their checkpoints
    import torch.distributed as tdist
    from common import dist
    tdist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size,
                             timeout=datetime.timedelta(seconds=900))
    dist.cleanup = lambda: None  # the scripts' main() ends with it: the pool's group stays
    while True:
        try:
            task = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if task is None:
            break
        out, err = io.StringIO(), io.StringIO()
        try:
            (where, args) = task
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                value = _resolve(*where)(*args)
            buffer = io.BytesIO()
            torch.save(value, buffer)
            reply = ("ok", buffer.getvalue())
        except BaseException:  # SystemExit too: a test that expects one catches it inside fn
            reply = ("error", f"{traceback.format_exc()}--- stdout:\n{out.getvalue()[-3000:]}--- stderr:\n"
                              f"{err.getvalue()[-3000:]}")
        conn.send_bytes(pickle.dumps(reply))
    tdist.destroy_process_group()


# ---------------------------------- checks that two script test files run ----------------------------------

def assert_ema_update_mixes(model, teacher, ema_update):
    """ema_update(teacher, model, 0.9) leaves every teacher weight at 0.9 teacher + 0.1 online, for a teacher
    (backbone and projector, no predictor) made to differ from its student first."""
    assert not any(k.startswith("predictor") for k in teacher.state_dict())  # backbone + projector only
    with torch.no_grad():  # a teacher that differs from the student, so the mix is visible
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p))
    before = {k: v.clone().double() for k, v in teacher.named_parameters()}
    online = {k: v.detach().double() for k, v in model.named_parameters()}
    ema_update(teacher, model, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p.double(), 0.9 * before[name] + 0.1 * online[name], rtol=0, atol=1e-6)


def assert_one_step_updates_the_frozen_teacher(module, build_teacher, tiny_cfg, m, ctx, image_folder):
    """One training step in this process (module.train_one_epoch, vit_debug, sgd at lr 30 and m0 0.5 so that the
    student moves and the mix is far from both endpoints): the EMA teacher stays outside DDP, never gets a gradient,
    and after the step equals m * theta_0 + (1 - m) * theta_1 (theta: the student before and after). mocov3 and byol
    (tests/test_mocov3.py, test_byol.py) differ in which step's momentum m is."""
    from common import augment, data, dist, optim
    cfg = tiny_cfg("vit_debug", "--optimizer", "sgd", "--lr", "30", "--warmup_epochs", "0", "--base_momentum", "0.5",
                   "--max_steps_per_epoch", "1")
    views = augment.ViewMaker(module.view_recipes(cfg, 32), 2, ctx.device, "cpu", "imagefolder")
    dataset = data.build_dataset("imagefolder", image_folder, "pretrain", views.transform)
    loader = data.train_loader(dataset, 8, ctx, 0, cfg.seed)
    torch.manual_seed(0)
    model = module.build_model(cfg, 32)
    model_ddp = dist.ddp(model, ctx)
    teacher = build_teacher(model)
    optimizer = optim.build_optimizer("sgd", optim.param_groups(model, cfg.weight_decay), lr=0.0)
    theta0 = {k: v.detach().clone().double() for k, v in model.named_parameters()}
    step, row = module.train_one_epoch(model_ddp, views, model, teacher, loader, optimizer,
                                       optim.grad_scaler("none", ctx.device), cfg, ctx, 0, 0, 2)
    assert step == 1 and math.isfinite(row["loss"])
    ddp_type = torch.nn.parallel.DistributedDataParallel
    assert not isinstance(teacher, ddp_type) and not any(isinstance(m_, ddp_type) for m_ in teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    moved = 0.0
    for name, p in teacher.named_parameters():
        theta1 = dict(model.named_parameters())[name].detach().double()
        torch.testing.assert_close(p.double(), m * theta0[name] + (1 - m) * theta1, rtol=0, atol=1e-6)
        moved = max(moved, float((p.double() - theta0[name]).abs().max()))
    assert moved > 1e-3  # the check above is not trivially satisfied by an unchanged teacher


# ------------------------ loop references of losses that more than one test file checks ------------------------

# RepDistiller's CIFAR-100 benchmark (github.com/HobbitLong/RepDistiller, README "Benchmark Results on CIFAR-100"):
# the columns of its two tables, in its order, transcribed here independently of scripts/run_table.py. The slides'
# six pairs (tests/test_ifacd_distill.py PAIRS) are among the first seven.
REPDISTILLER_SAME = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20",
                     "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8"]
REPDISTILLER_DIFF = ["vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8", "resnet32x4-ShuffleV1",
                     "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1"]
REPDISTILLER_PAIRS = REPDISTILLER_SAME + REPDISTILLER_DIFF


def naive_supcon(z, tau):
    """Khosla et al. Eq. 2 (L^sup_out), labels = the image: for every representation i of every image b,
    -1/|P(i)| sum_p log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)), averaged over all B*V anchors
    (z: (B, V, D), normalised here). ifaclr.ifaclr_loss and ifacd_distill.ifacd_loss are this loss."""
    b_n, v_n, _ = z.shape
    flat = [(b, v) for b in range(b_n) for v in range(v_n)]
    total = 0.0
    for b, v in flat:
        zi = F.normalize(z[b, v], dim=0)
        sims = {(c, w): torch.dot(zi, F.normalize(z[c, w], dim=0)) / tau for c, w in flat if (c, w) != (b, v)}
        log_denominator = torch.logsumexp(torch.stack(list(sims.values())), 0)
        positives = [sims[(b, w)] - log_denominator for w in range(v_n) if w != v]
        total = total - sum(positives) / len(positives)
    return total / len(flat)


# ------------------------------------------------ HostSyncCounter ------------------------------------------------
#
# HostSyncCounter: counts host synchronisations and dispatched ops, to assert code is sync-free.
#
# A GPU runs ahead of the Python thread that queues its work until the host needs a value the GPU
# computes: then the host waits for every queued kernel (a "host synchronisation") and the GPU idles
# while Python queues the next ones. A training step should have none. HostSyncCounter finds them on
# the CPU, where the tests run, by counting the operations that force one on a GPU:
#
#     from helpers import HostSyncCounter    # tests/ is on sys.path under pytest
#     with HostSyncCounter() as sync:
#         train_step(...)                    # eager mode (not under torch.compile)
#     assert sync.count == 0, sync.report()  # the report names each sync and the line that made it
#     print(sync.total_ops)                  # aten ops dispatched: a proxy for launch overhead
#
# Counted as a synchronisation (each occurrence counts 1):
# - a tensor's value read on the host: `.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`,
#   `f"{t:.2f}"` (aten._local_scalar_dense), and ops that return a Python bool (torch.equal,
#   torch.allclose, is_nonzero);
# - ops whose output shape depends on the data (the host reads it to allocate the output):
#   `nonzero` (also `torch.where(cond)`, `argwhere`), `masked_select`, boolean-mask indexing and
#   assignment (`x[mask]`, `x[mask] = v`: index / index_put with a bool or uint8 index), `unique`
#   (all forms), `bincount`, `repeat_interleave` with tensor repeats and no `output_size`, and linalg
#   error checks (`_linalg_check_errors`, e.g. torch.linalg.cholesky without `_ex`);
# - copies between host and device: `.tolist()`, `.numpy()`, `.cpu()`, `print(t)` (counted on a CPU
#   tensor too, where they copy nothing, because the same code copies on a GPU), and
#   `torch.tensor(data, device=...)` / `torch.as_tensor(data, device=...)` (Python data, copied to
#   the device with a blocking copy); on a GPU also every blocking (`non_blocking=False`) copy
#   between CPU and GPU memory, e.g. `x.to("cuda")` of a CPU tensor. On the CPU `x.to(device)` is
#   not counted: there it cannot tell a host-device copy from a no-op.
# Not counted, because they do not synchronise: `torch.where(c, a, b)`, `masked_fill`, `index_select`,
# `gather`, `sort`, `randperm`, `nonzero_static`, shapes (`x.shape[0]`), random draws on the device.
# The list covers the common cases, not every kernel (some cuSOLVER linalg ops synchronise inside):
# on a GPU, `torch.cuda.set_sync_debug_mode("warn")` is the authoritative check.
#
# `total_ops` counts each aten op that reaches the dispatcher once, forward and backward alike (an
# op's own internal calls are not counted; a `torch._foreach_*` call counts 1): it measures Python and
# dispatch work, not FLOPs.

aten = torch.ops.aten

# aten ops that read a tensor's value on the host, or whose output shape depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "value read on the host (.item(), int(t), bool(t), ...)",
    aten.equal.default: "torch.equal returns a Python bool",
    aten.allclose.default: "torch.allclose returns a Python bool",
    aten.is_nonzero.default: "is_nonzero returns a Python bool",
    aten.nonzero.default: "nonzero: output shape depends on the data",
    aten.masked_select.default: "masked_select: output shape depends on the data",
    aten.bincount.default: "bincount: output length depends on the data",
    aten._unique.default: "unique: output shape depends on the data",
    aten._unique2.default: "unique: output shape depends on the data",
    aten.unique_dim.default: "unique: output shape depends on the data",
    aten.unique_consecutive.default: "unique_consecutive: output shape depends on the data",
    aten.unique_dim_consecutive.default: "unique_consecutive: output shape depends on the data",
    aten._linalg_check_errors.default: "linalg error check reads the info tensor on the host",
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# Tensor methods and torch functions that copy to or from the host (counted in __torch_function__).
HOST_METHODS = {torch.Tensor.tolist: "tolist() copies to the host",
                torch.Tensor.numpy: "numpy() copies to the host",
                torch.Tensor.cpu: "cpu() copies to the host",
                torch.Tensor.__array__: "__array__ copies to the host",
                torch.Tensor.__repr__: "printing a tensor copies it to the host"}
HOST_DATA = {torch.tensor: "torch.tensor(data, device=...) copies host data to the device",
             torch.as_tensor: "torch.as_tensor(data, device=...) copies host data to the device"}
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _sync_reason(func, args, kwargs):
    """Why this aten call synchronises on a GPU, or None."""
    if func in SYNC_OPS:
        return SYNC_OPS[func]
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{func}: boolean-mask indexing (output shape depends on the data)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size"
    if func in COPIES:  # _to_copy(src, device=..., non_blocking=...), copy_(dst, src, non_blocking)
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device") or args[0].device
        else:
            src, dst = args[1], args[0].device
        blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
        kinds = {src.device.type, torch.device(dst).type}
        if blocking and "cpu" in kinds and len(kinds) == 2 and "meta" not in kinds:
            return f"{func}: blocking copy between host and device"
    return None


def _caller():
    """The innermost stack frame outside torch and this file, as 'path:line in function'."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            return f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counter.ops[str(func)] += 1
        if not self.counter._in_host_copy:
            reason = _sync_reason(func, args, kwargs)
            if reason:
                self.counter._record(reason)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = HOST_METHODS.get(func)
        if reason is None and func in HOST_DATA and kwargs.get("device") is not None:
            reason = HOST_DATA[func]
        if reason is None or self.counter._in_host_copy:
            return func(*args, **kwargs)
        self.counter._record(reason)
        self.counter._in_host_copy = True  # its own copy (on a GPU) is this same sync
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._in_host_copy = False


class HostSyncCounter:
    """Context manager: counts the host synchronisations (see the module docstring) and the aten
    ops dispatched inside it, on any device. Attributes, after or during the block:
      count      number of host synchronisations;
      syncs      list of (reason, 'file:line in function'), the innermost caller outside torch;
      ops        collections.Counter of dispatched aten ops by name ('aten.add.Tensor': 3, ...);
      total_ops  sum of ops.
    A counter may be entered again: each `with` block adds to the same totals."""

    def __init__(self):
        self.ops = collections.Counter()
        self.syncs = []
        self._in_host_copy = False
        self._modes = []

    @property
    def count(self):
        return len(self.syncs)

    @property
    def total_ops(self):
        return sum(self.ops.values())

    def _record(self, reason):
        self.syncs.append((reason, _caller()))

    def report(self):
        """One line per synchronisation (for assertion messages)."""
        lines = [f"{len(self.syncs)} host synchronisation(s), {self.total_ops} ops"]
        return "\n".join(lines + [f"  {where}: {reason}" for reason, where in self.syncs])

    def __enter__(self):
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
        return False
