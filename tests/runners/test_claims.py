"""scripts/claims.py (`run_table.py claims`): the verdict logic on constructed records (each verdict), and
the runner end to end on tiny Fashion-MNIST idx files: 2 seeds, a few steps, records, the report, and a
second call that finds everything done (resume); its runs in this process (helpers.InProcess) and, slow, each in
its own interpreter as in real use. Also claim 1's diagnostic, scripts/collapse_probe.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import simsiam_gsg
from common import checkpoint, config, log
from helpers import ROOT, InProcess, env, run_python, write_fashion

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import claims as C  # noqa: E402  (scripts/claims.py)
import collapse_probe as P  # noqa: E402  (scripts/collapse_probe.py: claim 1's diagnostic)
import run_table as R  # noqa: E402  (scripts/run_table.py)
import runs  # noqa: E402  (scripts/runs.py: the runners' launches)


def records(a_values, b_values, metric="knn20"):
    """{arm: {seed: record}} for two arms with the given per-seed values."""
    return {arm: {s: {"metrics": {metric: v}} for s, v in enumerate(values)}
            for arm, values in (("a", a_values), ("b", b_values))}


@pytest.mark.parametrize("a, b, kind, expected", [
    ([80.0, 81.0, 80.5], [70.0, 70.2, 69.9], ">", "reproduced"),  # +10.5, tight
    ([70.0, 70.2, 69.9], [80.0, 81.0, 80.5], ">", "reversed"),
    ([70.0, 72.0, 69.0], [71.0, 70.0, 70.5], ">", "not shown"),  # -1, +2, -1.5
    ([70.0], [60.0], ">", "too few seeds"),
    ([70.1, 70.3, 69.8], [70.0, 70.2, 70.0], "~1", "reproduced"),  # within 1 point
    ([75.0, 75.2, 75.1], [70.0, 70.1, 70.0], "~1", "reversed"),  # 5 points apart
    ([71.0, 69.0, 72.5], [70.0, 70.0, 70.0], "~1", "not shown"),  # the interval crosses the margin
])
def test_verdicts(a, b, kind, expected):
    diffs, mean, half, verdict = C.compare(records(a, b), ("label", "knn20", "a", "b", kind, ""))
    assert diffs == pytest.approx([x - y for x, y in zip(a, b)]) and verdict == expected


def test_interval_is_the_paired_t_interval():
    mean, half = C.interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / 3 ** 0.5)


def test_within_run_comparisons_and_missing_seeds():
    recs = {"run": {0: {"metrics": {"linear": 80.0, "head_linear": 70.0}},
                    1: {"metrics": {"linear": 81.0, "head_linear": 70.5}},
                    2: {"metrics": {"linear": 79.0}}}}  # seed 2's second probe is missing: left out
    diffs, _, _, verdict = C.compare(recs, ("h - g(h)", "linear - head_linear", "run", None, ">", ""))
    assert diffs == [10.0, 10.5] and verdict == "reproduced"
    assert C.compare(recs, ("x", "linear", "run", "absent", ">", ""))[3] == "not run"


def test_the_report_reads_every_recorded_seed_not_only_the_requested_ones(tmp_path):
    """Seeds added later (`--seeds 3 4`) join the report run without --seeds; files that are not
    records are ignored."""
    os.makedirs(tmp_path / "c1")
    for name in ("stop_grad_seed0", "stop_grad_seed4", "stop_grad_seed12", "random_init_seed1"):
        json.dump({"metrics": {"knn20": 1.0}}, open(tmp_path / "c1" / f"{name}.json", "w"))
    open(tmp_path / "c1" / "stop_grad_seed0.json.tmp", "w").write("{}")
    args = C.parse_args(["--records", str(tmp_path), "--seeds", "0"])[0]
    assert {arm: list(recs) for arm, recs in C.load_records(args, "1").items()} == {
        "stop_grad": [0, 4, 12], "random_init": [1]}


def test_every_claim_names_its_config_arms_and_metrics():
    for claim, spec in C.CLAIMS.items():
        assert os.path.isfile(C.config_path(spec["config"])), claim
        arms = set(spec["arms"]) | set(spec.get("baselines", {}))
        for label, metric, a, b, kind, paper in spec["comparisons"]:
            assert a in arms and (b is None or b in arms) and (kind == ">" or kind.startswith("~")), label
        assert C.header_lines(spec).startswith(f"Claim {claim}"), claim  # the protocol, written first


@pytest.mark.parametrize("claim", sorted(C.CLAIMS))
def test_every_arm_parses(claim):
    """Each arm's command line (its config + flags) parses against its script's Config, as does a setup run's."""
    import importlib
    from common import config
    spec = C.CLAIMS[claim]
    module = importlib.import_module(spec["script"][:-3])
    for flags in spec["arms"].values():
        config.parse(module.Config, ["--config", C.config_path(spec["config"]), *flags])
    for cfg, flags in spec.get("setup", {}).values():
        config.parse(module.Config, ["--config", C.config_path(cfg), *flags])


@pytest.fixture(params=["in_process", pytest.param("processes", marks=pytest.mark.slow)])
def run_claims(request, monkeypatch, capsys):
    """`python scripts/run_table.py claims ARGV`, its stdout returned: in_process, the runner and every run it
    launches in this process (the default run); processes (slow: an interpreter per run), as a user runs it."""
    if request.param == "in_process":
        request.getfixturevalue("process_group")
        monkeypatch.setattr(runs, "subprocess", InProcess)

        def in_process(*argv):
            capsys.readouterr()
            R.main(["claims", *argv])
            return capsys.readouterr().out
        return in_process

    def processes(*argv):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_table.py"), "claims", *argv],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout
    return processes


def test_claims_runner_end_to_end(run_claims, tmp_path):
    data_dir = write_fashion(str(tmp_path / "data"), train=40, test=20)
    paths = ["--out_root", str(tmp_path / "out"), "--records", str(tmp_path / "runs"),
             "--report", str(tmp_path / "claims.md")]
    argv = ["--claims", "1", "--seeds", "0", "1", "--data_dir", data_dir, "--linear_epochs", "1", *paths,
            "--", "--epochs", "1", "--max_steps_per_epoch", "2", "--batch_size", "8", "--knn_bank", "0"]
    first = run_claims(*argv)
    assert first.count("# running: ") == 2 * (2 + 3)  # per seed: 2 trainings, 3 evaluations (one baseline)
    for arm in ("stop_grad", "no_stop_grad", "random_init"):
        for seed in (0, 1):
            rec = json.load(open(tmp_path / "runs" / "c1" / f"{arm}_seed{seed}.json"))
            assert {"knn20", "linear"} <= set(rec["metrics"]) and rec["machine"] and rec["git"]
            assert (arm == "random_init") == ("out_std" not in rec["metrics"])
    report = open(tmp_path / "claims.md").read()
    assert "### Claim 1: SimSiam" in report and "| out_std (last epoch): stop-grad - none | 2 |" in report
    assert "<!-- end of claim 7 -->" in report and report.count("Not run yet.") == len(C.CLAIMS) - 1
    try:  # the figures need matplotlib (not a requirement); where it is, the first report already links them
        import matplotlib  # noqa: F401
        assert "![claim 1](c1_collapse.png)" in report
    except ImportError:
        assert "![claim 1]" not in report
    # resume: everything done is skipped; a lost record comes back from the run's files, without training
    os.remove(tmp_path / "runs" / "c1" / "no_stop_grad_seed1.json")
    with open(tmp_path / "claims.md", "a") as f:
        f.write("\nA note written by hand.\n")
    second = run_claims(*argv)
    assert "# running" not in second and second.count("# done") == 5
    assert os.path.exists(tmp_path / "runs" / "c1" / "no_stop_grad_seed1.json")
    assert "A note written by hand." in open(tmp_path / "claims.md").read()  # kept outside the blocks


def test_block_table_and_summary():
    """Per-block metrics go to their own table (a column per block, mean ± std over seeds); the summary
    counts each claim's verdicts and says how many comparisons still lack a second seed."""
    recs = {"sd": {s: {"metrics": {"teacher_b1_knn20": 70.0 + s, "teacher_b2_knn20": 75.0}} for s in (0, 1)}}
    lines = C.block_lines(recs)
    assert "| sd | teacher_knn20 | 70.50 ± 0.71 | 75.00 ± 0.00 |" in lines and "block 2" in lines[2]
    assert C.block_lines({"a": {0: {"metrics": {"knn20": 1.0}}}}) == []
    args = C.parse_args(["--records", "/nonexistent"])[0]
    summary = C.summary_lines(args)
    assert len(summary) == 3 + len(C.CLAIMS) and all("not run yet" in line for line in summary[2:-1])


def test_budget_plans_the_tables_commands_and_scales_one_epoch(tmp_path):
    """scripts/claims_budget.py times the commands `run_table.py claims` runs (one seed; claim 6's teacher
    as a setup run, once), groups evaluations by kind, and scales a 1-epoch time by the epochs after the
    start-up."""
    import claims_budget as B
    root = str(tmp_path)
    steps = B.plan(["1", "6"], root)
    trains = [cmd for kind, _, cmd in steps if kind == "train"]
    assert [c for kind, c, _ in steps if kind == "train"] == ["6", "1", "1"] + ["6"] * 5  # setup runs first
    assert [B.is_setup(cmd, root) for cmd in trains] == [True] + [False] * 7
    assert [B.epochs_of(cmd) for cmd in trains] == [12, 5, 5] + [25] * 5
    kinds = {B.eval_kind(cmd) for kind, c, cmd in steps if kind == "eval"}
    assert kinds == {"", "--dataset fashion_mnist --arch resnet8"}  # claim 1's trained arms share one; 6 has none
    assert B.full_run(one_epoch=12.0, epochs=25, startup=7.0) == 7.0 + 25 * 5.0
    assert C.timed is runs.timed  # planning leaves the runner's own launch in place


def test_collapse_probe_tells_a_collapse_to_one_direction_from_a_spread(tmp_path, capsys):
    """scripts/collapse_probe.py (claim 1's diagnostic): z = s u (one direction, s = +-1 per image)
    keeps out_std near its healthy 1/sqrt(D) but has top-1 share 1 and effective rank 1; isotropic z
    spreads over nearly all of its D directions; a simsiam_gsg checkpoint goes through the probe, another
    script's is refused by name."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 64
    one_direction = (torch.randint(0, 2, (n, 1), generator=g) * 2.0 - 1) * torch.randn(1, d, generator=g)
    spectrum = log.output_spectrum(one_direction)
    assert spectrum["out_top1"] > 0.999 and spectrum["out_rank"] < 1.01
    assert log.output_std(one_direction) > 0.5 / d ** 0.5  # the paper's monitor does not see this collapse
    spectrum = log.output_spectrum(torch.randn(n, d, generator=g))
    assert spectrum["out_top1"] < 0.05 and spectrum["out_rank"] > 0.8 * d
    assert log.output_spectrum(torch.ones(n, d)) == {"out_top1": 1.0, "out_rank": 1.0}  # one point

    cfg = config.parse(simsiam_gsg.Config, ["--dataset", "fake", "--arch", "resnet8", "--proj_hidden_dim",
                                            "32", "--proj_dim", "16", "--pred_hidden_dim", "8"])
    path = str(tmp_path / "last.pt")
    checkpoint.save(path, 1, 7, config.to_dict(cfg), model=simsiam_gsg.build_model(cfg, 32))
    row = P.probe(path, batches=2, batch_size=32)
    assert (row["step"], row["dim"]) == (7, 16)
    assert 0 < row["out_std"] < 1 and row["pre_bn_var"] > 0 and 1 <= row["effective_rank"] <= 16
    assert row["h_dim"] == 64 and 1 <= row["h_effective_rank"] <= 64  # resnet8's features
    out = tmp_path / "probe.json"  # the command line: one line per checkpoint, the rows as JSON
    P.main([path, "--batches", "1", "--json", str(out)])
    (written,) = json.loads(out.read_text())
    assert written["checkpoint"] == path and written["step"] == 7 and written["dim"] == 16
    assert f"{path}: step 7, out_std " in capsys.readouterr().out
    other = str(tmp_path / "simclr.pt")  # another script's checkpoint: named, not a load_state_dict traceback
    checkpoint.save(other, 1, 7, {"arch": "resnet8"}, model=torch.nn.Linear(2, 2))
    with pytest.raises(config.ConfigError, match="not a simsiam_gsg.py checkpoint"):
        P.probe(other)


@pytest.mark.e2e
def test_collapse_probe_command_line_error_is_one_line(tmp_path):
    """`python scripts/collapse_probe.py` on another script's checkpoint: one line, exit status 2, as every tool
    (README: an unreadable checkpoint stops with one line and exit status 2)."""
    other = str(tmp_path / "simclr.pt")
    checkpoint.save(other, 1, 7, {"arch": "resnet8"}, model=torch.nn.Linear(2, 2))
    out = run_python(os.path.join(ROOT, "scripts", "collapse_probe.py"), other)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: {other} is not a simsiam_gsg.py checkpoint")
