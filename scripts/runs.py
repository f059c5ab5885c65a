"""Launching training and evaluation processes and reading what they wrote: what every table runner
shares (scripts/run_table.py, fashion_mnist.py, claims.py). Nothing here imports torch unless a
last.pt must be read."""
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(cfg_path, run_dir, nproc, extra, seed=None, teacher_ckpt=None,
            script="ifacd_distill.py"):
    """The launch of one run: torchrun with nproc processes (plain python for nproc 0)."""
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [])
    cmd = [sys.executable, *launcher, os.path.join(ROOT, script), "--config", cfg_path,
           "--output_dir", run_dir]
    cmd += ["--seed", str(seed)] if seed is not None else []
    cmd += ["--teacher_ckpt", os.path.join(teacher_ckpt, "last.pt")] if teacher_ckpt else []
    return cmd + extra


def launch(cmd, dry_run, threads=0, log_path=""):
    """Run one process to its end (or print it for a dry run); returns its wall time in seconds (0
    for a dry run). threads > 0 sets OMP_NUM_THREADS; log_path takes its output instead of the
    terminal."""
    if dry_run:
        print(" ".join(cmd))
        return 0.0
    print(f"# running: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    if log_path:
        with open(log_path, "a") as f:
            subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)
    else:
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    return time.perf_counter() - start


def timed(cmd, run_dir, key, dry_run, threads=0, log_path=""):
    """Launch cmd (or print it for a dry run) and add its wall time to run_dir/time.json[key]: an
    interrupted run's attempts add up. Returns the seconds of this attempt."""
    seconds = launch(cmd, dry_run, threads, log_path)
    if not dry_run:
        path = os.path.join(run_dir, "time.json")
        times = read_json(path) or {}
        times[key] = times.get(key, 0.0) + seconds
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(times, f)
    return seconds


def is_complete(run_dir):
    """True if run_dir/last.pt reached the last epoch of its own config."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return False
    sys.path.insert(0, ROOT)
    # imported only here: torch is slow to import and dry runs rarely need it
    from common import checkpoint
    blob = checkpoint.load(path)
    return blob["epoch"] >= blob["config"]["epochs"]


def log_rows(run_dir):
    """The rows of run_dir/log.jsonl (none if it does not exist)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    """The JSON object in path, or None if there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine():
    """One line naming the machine and the software: what a table's numbers were measured on."""
    import importlib.metadata
    return (f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), "
            f"Python {platform.python_version()}, torch {importlib.metadata.version('torch')}")
