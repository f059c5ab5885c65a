"""What the claims table costs on this machine, measured alone: every training command of one seed
run for one epoch, each kind of evaluation once, two processes at a time (the table's mode on 2
cores), and a run's start-up; prints each run's estimate and the whole table's. Run it with nothing
else on the machine (about 15 minutes on 2 cores for every claim).

    python scripts/claims_budget.py                  # every claim, 3 seeds
    python scripts/claims_budget.py --claims 1 7     # a part

A full run is estimated as start-up + epochs x (its one-epoch time - start-up). The start-up (the
interpreter, the data, the model, up to the first step) is measured once, on the training command
with the most epochs, as its 1-epoch run minus half the difference to its 3-epoch run. A setup run
(claim 6's teacher) counts once, every other run once per seed.
"""
import argparse
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

import claims

ROOT = claims.ROOT


def plan(wanted, out_root):
    """[(kind, claim, cmd)] of one seed: the commands `run_table.py claims` would run, in order."""
    steps = []

    def collect(cmd, out, key, *rest):  # in place of runs.timed
        claim = os.path.relpath(out, out_root).split(os.sep)[0][1:]
        steps.append(("train" if key == "train_s" else "eval", claim, cmd))

    args, extra = claims.parse_args(["--dry_run", "--seeds", "0", "--out_root", out_root,
                                     "--records", os.path.join(out_root, "records"),
                                     "--claims", *wanted])
    claims.run_all(args, extra, launch=collect)
    return steps


def is_setup(cmd, out_root):
    """A run that every arm of its claim reads (claim 6's teacher), trained once, not per seed."""
    return "seed0" not in os.path.relpath(cmd[cmd.index("--output_dir") + 1], out_root)


def timed_run(cmd):
    """Wall seconds of one command, one thread; a failed command stops the measurement, its error
    shown."""
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return time.monotonic() - start


def epochs_of(cmd):
    with open(cmd[cmd.index("--config") + 1]) as f:
        return int(yaml.safe_load(f)["epochs"])


def full_run(one_epoch, epochs, startup):
    """A run's estimated seconds from its 1-epoch time."""
    return startup + epochs * (one_epoch - startup)


def eval_kind(cmd):
    """An evaluation's flags without its paths and seed: runs of one kind cost the same."""
    skip = ("--data_dir", "--json", "--checkpoint", "--seed", "--linear_epochs")
    return " ".join(a for a in cmd[3:]
                    if not a.startswith(os.sep) and not a.isdigit() and a not in skip)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--claims", nargs="+", default=list(claims.CLAIMS), choices=list(claims.CLAIMS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm in the table")
    args = p.parse_args(argv)
    out_root = tempfile.mkdtemp(prefix="claims_budget_")
    steps = plan(args.claims, out_root)
    trains = [(c, cmd) for kind, c, cmd in steps if kind == "train"]
    evals = {}
    for kind, c, cmd in steps:
        if kind == "eval":
            evals.setdefault((c, eval_kind(cmd)), []).append(cmd)
    for cmds in evals.values():  # an evaluation at random init writes into a run folder of its own
        os.makedirs(os.path.dirname(cmds[0][cmds[0].index("--json") + 1]), exist_ok=True)
    epochs = [epochs_of(cmd) for _, cmd in trains]
    longest = max(range(len(trains)), key=epochs.__getitem__)
    cmd = trains[longest][1]
    at = cmd.index("--output_dir") + 1
    three_epochs = cmd[:at] + [os.path.join(out_root, "startup")] + cmd[at + 1:] + ["--epochs", "3"]
    setup = [i for i, (c, cmd) in enumerate(trains) if is_setup(cmd, out_root)]
    one = {}
    with ThreadPoolExecutor(2) as pool:  # setup runs (a teacher the arms read) first, then the arms
        for part in (setup, [i for i in range(len(trains)) if i not in setup]):
            walls = pool.map(lambda i: timed_run(trains[i][1] + ["--epochs", "1"]), part)
            one.update(zip(part, walls))
        three = pool.submit(timed_run, three_epochs)
        once = list(pool.map(lambda cmds: timed_run(cmds[0]), evals.values()))
        three = three.result()
    startup = max(0.0, one[longest] - (three - one[longest]) / 2)
    print(f"# start-up {startup:.1f} s; {claims.machine()}; OMP_NUM_THREADS=1, two runs at a "
          "time\n")
    print("| claim | run | epochs | one epoch (s) | full run (min) | runs in the table |")
    print("|---|---|---:|---:|---:|---:|")
    total = 0.0
    for i, (c, cmd) in enumerate(trains):
        run = os.path.relpath(cmd[cmd.index("--output_dir") + 1], out_root)
        n = 1 if i in setup else args.seeds  # a setup run (a teacher) is trained once
        seconds = full_run(one[i], epochs[i], startup)
        total += n * seconds
        print(f"| {c} | {run} | {epochs[i]} | {one[i] - startup:.1f} | {seconds / 60:.1f} "
              f"| {n} |")
    for ((c, kind), cmds), wall in zip(evals.items(), once):
        total += len(cmds) * args.seeds * wall
        print(f"| {c} | eval.frozen {kind} | | | {wall / 60:.1f} | {len(cmds) * args.seeds} |")
    print(f"\nthe whole table: {total / 60:.0f} job-minutes, {total / 120:.0f} minutes on 2 cores "
          f"two at a time ({total / 7200:.2f} hours)")


if __name__ == "__main__":
    main()
