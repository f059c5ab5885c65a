"""Logging: print0 (rank 0 only, explicit), device-side meters, log.jsonl rows, and the training
progress line.

Nothing here syncs the GPU every step: meters accumulate on the device and are read every
`log_every` steps, which is also when a non-finite loss is reported (with the exact step at which it
first appeared).
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from tqdm import tqdm

from common import config


def is_main():
    return not tdist.is_initialized() or tdist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def git_sha():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=sys.path[0] or None)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_jsonl(path, row):
    """Append one JSON object as a line (rank 0 only)."""
    if is_main():
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def end_epoch(output_dir, epoch, step, row):
    """The epoch's line on rank 0 and its row in output_dir/log.jsonl."""
    print0(f"epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items()))
    append_jsonl(os.path.join(output_dir, "log.jsonl"), {"epoch": epoch, "step": step, **row})


def output_std(z):
    """The collapse monitor every SSL script logs as `out_std` (SimSiam Sec. 4.1, Fig. 2): the std
    over the batch of each channel of the L2-normalised outputs, averaged over channels (and over
    any leading dims). z: (..., n, D), the projections the loss compares with (the targets' side).
    About 1/sqrt(D) when the outputs spread over the sphere, 0 when they have collapsed to one
    vector. On the device: no host sync."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=-2).mean()


def output_spectrum(z):
    """The second collapse monitor, logged once per epoch on the epoch's last batch (this rank's):
    `out_top1`, the share of the variance of z/|z| (centred over the batch) along its first
    principal direction, and `out_rank`, its effective rank (exp of the entropy of the normalised
    singular values, Roy & Vetterli 2007): how many directions the outputs still spread over. A
    collapse to one direction (z = s u, a number s per image) can keep out_std near healthy, when s
    changes sign over the batch (docs/claims.md, claim 1), but takes out_top1 and out_rank to 1.
    z: (n, D). One SVD and a host sync: once per epoch, not per step. Every z the same vector:
    (1, 1)."""
    zn = F.normalize(z.detach().float(), dim=-1)
    s = torch.linalg.svdvals(zn - zn.mean(0))
    if not s.sum() > 0:
        return {"out_top1": 1.0, "out_rank": 1.0}
    share, p = s ** 2 / (s ** 2).sum(), s / s.sum()
    return {"out_top1": share[0].item(),
            "out_rank": torch.exp(-(p * p.clamp_min(1e-30).log()).sum()).item()}


class Meter:
    """Running average of a scalar tensor, kept on its device. Also records the first step whose
    value was not finite, so the check costs no GPU sync per step (`check` syncs once)."""

    def __init__(self):
        self.total, self.count, self.first_bad = 0.0, 0, None

    def update(self, value, step, n=1):
        value = value.detach().float()
        self.total = self.total + value * n
        self.count += n
        bad = torch.where(torch.isfinite(value), -1, step)
        self.first_bad = (bad if self.first_bad is None
                          else torch.where(self.first_bad >= 0, self.first_bad, bad))

    def check(self, name="loss"):
        if self.first_bad is not None and int(self.first_bad) >= 0:
            raise FloatingPointError(f"{name} is not finite at step {int(self.first_bad)}; lower "
                                     f"the learning rate, try --amp none, or resume from the last "
                                     f"good last.pt")

    @property
    def avg(self):
        return float(self.total) / max(1, self.count)

    def global_avg(self):
        """The average over all ranks' samples."""
        t = torch.stack([torch.as_tensor(self.total, dtype=torch.float64).cpu(),
                         torch.tensor(float(self.count), dtype=torch.float64)])
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            t = t.to("cuda" if tdist.get_backend() == "nccl" else "cpu")
            tdist.all_reduce(t)
        return float(t[0] / t[1].clamp(min=1))


def _cuda():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def reset_peak_memory():
    """Count peak memory from here on: CUDA's allocator statistics, or on Linux the process's
    resident-set high-water mark (writing 5 to /proc/self/clear_refs resets it; elsewhere the CPU
    peak includes everything before)."""
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory():
    """{'peak_mem_gb': tensors allocated on this GPU} on CUDA, {'peak_rss_gb': the process's peak
    RSS} on the CPU (which also holds the dataset and torch itself: compare runs with each other,
    not with GPU figures)."""
    if _cuda():
        return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    # Linux reports KiB
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Progress:
    """Iterates over a loader for one epoch (stopping after `max_steps` if > 0), measures the time
    spent waiting for data, and shows a tqdm bar on a terminal or prints one line every `log_every`
    steps otherwise (rank 0).
    `batch_size` is the global batch, so img/s counts all ranks."""

    def __init__(self, loader, epoch, max_steps, log_every, batch_size):
        self.loader, self.epoch, self.log_every, self.batch_size = (loader, epoch, log_every,
                                                                    batch_size)
        self.total = min(len(loader), max_steps) if max_steps > 0 else len(loader)
        self.bar = tqdm(total=self.total, desc=f"epoch {epoch}", dynamic_ncols=True,
                        disable=not (is_main() and sys.stderr.isatty()))
        self.data_time = 0.0
        reset_peak_memory()
        self.start = time.perf_counter()
        self.img_per_s = 0.0

    def __iter__(self):
        it = iter(self.loader)
        for i in range(self.total):
            t0 = time.perf_counter()
            batch = next(it)
            self.data_time += time.perf_counter() - t0
            yield batch
            self.bar.update(1)
        self.bar.close()
        self.elapsed = time.perf_counter() - self.start
        self.img_per_s = self.total * self.batch_size / max(1e-9, self.elapsed)

    def stats(self):
        """The epoch's throughput for log.jsonl: images/s over all ranks, the fraction of the time
        spent waiting for data, and the epoch's peak memory (see peak_memory)."""
        return {"img_per_s": self.img_per_s, "data_frac": self.data_time / max(1e-9, self.elapsed),
                **peak_memory()}

    def log(self, i, step, meter, **fields):
        """Call once per step with the step index in the epoch; prints every log_every steps (and
        checks the loss)."""
        if (i + 1) % self.log_every and i + 1 != self.total:
            return
        meter.check()
        elapsed = time.perf_counter() - self.start
        row = {"loss": f"{meter.avg:.4f}", **{k: f"{v:.4g}" for k, v in fields.items()},
               "img/s": f"{(i + 1) * self.batch_size / elapsed:.0f}",
               "data": f"{self.data_time / elapsed:.0%}"}
        if _cuda():
            row["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
        if self.bar.disable:
            fields = " ".join(f"{k} {v}" for k, v in row.items())
            print0(f"epoch {self.epoch} [{i + 1}/{self.total}] step {step} {fields}")
        else:
            self.bar.set_postfix(row, refresh=False)


def start(cfg, ctx):
    """Create output_dir, print the git sha, world and resolved config, and write
    output_dir/config.yaml."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    print0(f"git {git_sha()} | {ctx.world_size} rank(s) on {ctx.device}")
    print0("config: " + " ".join(f"{k}={v}" for k, v in config.to_dict(cfg).items()))
    if ctx.is_main:
        config.write_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
