"""eval/analysis.py: Eq. 7-9 and linear CKA against naive references and analytic cases, the seeded views, and the
tool end to end (1 process with --compare, then 2 ranks on the gloo pool: the same numbers)."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint
from common.config import ConfigError
from eval import analysis, layers
from eval.analysis import alignment, cka_matrix, layer_metrics, linear_cka, pair_sums


def naive_pairs(x, t, gamma):
    """log mean exp(-t d^2) and mean d^gamma over ordered pairs i != j, by loops in float64."""
    e, d, n = 0.0, 0.0, x.shape[0]
    for i in range(n):
        for j in range(n):
            if i != j:
                r = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], x[j])))
                e += math.exp(-t * r ** 2)
                d += r ** gamma
    return math.log(e / (n * (n - 1))), d / (n * (n - 1))


def test_alignment_matches_loop_and_is_zero_for_identical_pairs():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1)
    for gamma in (2.0, 1.0, 3.0):
        ref = sum(math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x[i], y[i]))) ** gamma for i in range(9)) / 9
        assert float(alignment(x, y, gamma)) == pytest.approx(ref, rel=1e-12)
    assert float(alignment(x, x.clone())) == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("t,gamma", [(2.0, 2.0), (0.5, 1.0)])
def test_pair_sums_match_loops_for_any_chunk_and_rank_split(chunk, t, gamma):
    x = F.normalize(torch.randn(13, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=1)
    n = x.shape[0]
    uni_ref, neg_ref = naive_pairs(x, t, gamma)
    sums = pair_sums(x, t, gamma, chunk)
    assert math.log(sums[0] / (n * (n - 1))) == pytest.approx(uni_ref, rel=1e-10)
    assert float(sums[1]) / (n * (n - 1)) == pytest.approx(neg_ref, rel=1e-10)
    split = sum(pair_sums(x, t, gamma, chunk, rank=r, world=3) for r in range(3))  # 3 ranks cover each pair once
    assert torch.allclose(split, sums, rtol=1e-12)


def test_uniformity_orders_circle_below_collapse_and_matches_bessel_limit():
    n = 360
    angle = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    circle = torch.stack([angle.cos(), angle.sin()], dim=1)  # points uniform on S^1
    collapsed = torch.tensor([[1.0, 0.0]], dtype=torch.float64).repeat(n, 1)
    two = circle[torch.arange(n) // 180 * 180]  # two antipodal clusters: half at 0, half at 180 degrees
    uni = {k: math.log(pair_sums(v, 2.0, 2.0, 50)[0] / (n * (n - 1)))
           for k, v in {"circle": circle, "collapsed": collapsed, "two": two}.items()}
    assert uni["collapsed"] == pytest.approx(0.0, abs=1e-12)  # log E exp(0) = 0: the worst possible value
    assert uni["circle"] < uni["two"] < uni["collapsed"]
    # E_{x != y} exp(-2 ||x - y||^2) on n equispaced points = (n e^{-4} I0(4) - 1) / (n - 1) (d^2 = 2 - 2 cos).
    bessel = (n * math.exp(-4.0) * float(torch.special.i0(torch.tensor(4.0, dtype=torch.float64))) - 1) / (n - 1)
    assert uni["circle"] == pytest.approx(math.log(bessel), rel=1e-9)
    # Eq. 9 with gamma 2 on the same circle: sum over j != i of (2 - 2 cos) = 2n, so the mean is 2n / (n - 1).
    assert float(pair_sums(circle, 2.0, 2.0, 64)[1]) / (n * (n - 1)) == pytest.approx(2 * n / (n - 1), rel=1e-12)


def test_layer_metrics_hand_computed():
    # View 1: three unit vectors at 0, 90 and 180 degrees; view 2: each rotated by 90 degrees.
    v1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    v2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    m = layer_metrics(v1, v2)
    assert m["alignment"] == pytest.approx(2.0)  # ||x - Rx||^2 = 2 for a 90-degree rotation of a unit vector
    # Pairs of view 1: squared distances 2 (0-90), 4 (0-180), 2 (90-180).
    assert m["neg_alignment"] == pytest.approx(8 / 3)
    assert m["ali_ratio"] == pytest.approx(4 / 3)  # R = L^n_ali / L_ali
    uni = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert m["uniformity"] == pytest.approx(uni) and m["uni_ali_ratio"] == pytest.approx(-uni / 2)
    assert layer_metrics(v1, v2, gamma=1.0)["neg_alignment"] == pytest.approx((2 * math.sqrt(2) + 2) / 3)


def naive_cka(x, y):
    """CKA from HSIC with linear kernels (Kornblith et al. 2019): HSIC(K, L) = tr(K H L H) / (n - 1)^2."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def test_linear_cka_matches_hsic_and_invariances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64) + 3.0  # an offset: centring matters
    noise = torch.randn(20, 7, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 7, generator=g, dtype=torch.float64) + 0.5 * noise
    assert linear_cka(x, y) == pytest.approx(naive_cka(x, y), rel=1e-10)
    assert 0.1 < linear_cka(x, y) < 0.999
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))  # orthogonal
    assert linear_cka(x, 4.2 * y @ q) == pytest.approx(linear_cka(x, y), rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(linear_cka(x, y), rel=1e-5)  # float32 input is promoted
    # ... but not invariant to an anisotropic scaling (so the checks above can fail).
    assert abs(linear_cka(x, y * torch.tensor([10.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)) - linear_cka(x, y)) > 1e-3
    m = cka_matrix([x, y], [y, x, x])
    assert len(m) == 2 and len(m[0]) == 3 and m[0][1] == pytest.approx(1.0) and m[1][0] == pytest.approx(1.0)


def test_seeded_views_are_reproducible_and_distinct(image_folder):
    from common.data import build_dataset
    from common.augment import byol_recipes, to_torchvision
    base = build_dataset("imagefolder", image_folder, "val", to_torchvision(byol_recipes(32)[1]))
    a, b = analysis.SeededView(base, 0), analysis.SeededView(base, 100)
    before = torch.get_rng_state()
    first = a[3][0]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG stream is untouched
    torch.manual_seed(123)
    assert torch.equal(a[3][0], first) and not torch.equal(b[3][0], first) and not torch.equal(a[4][0], first)


def write_checkpoint(path, data_dir, seed, arch="vit_debug"):
    from common.models import build_model
    torch.manual_seed(seed)
    model = nn.Module()
    model.backbone = build_model(arch, image_size=32, patch_size=8)
    cfg = dict(arch=arch, image_size=32, patch_size=8, num_heads=0, dataset="imagefolder", data_dir=data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.save(path, 1, 2, cfg, model=model)
    return path


def test_bad_input_is_a_config_error(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint is required"):
        analysis.main([])
    vit = write_checkpoint(str(tmp_path / "v" / "last.pt"), image_folder, 0)
    with pytest.raises(ConfigError, match="another image size than 64"):
        analysis.main(["--checkpoint", vit, "--image_size", "64"])


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        layers.pyplot()


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(alignment=0.5, uniformity=-2.0, uni_ali_ratio=4.0, neg_alignment=1.5, ali_ratio=3.0)] * 2
    analysis.plot_metrics({"a": rows, "b": rows}, [1, 2], str(tmp_path / "m.png"))
    analysis.plot_cka([[1.0, 0.5], [0.5, 1.0]], "t", "x", "y", str(tmp_path / "c.png"))
    assert os.path.getsize(tmp_path / "m.png") > 1000 and os.path.getsize(tmp_path / "c.png") > 1000


def read(folder, name):
    with open(os.path.join(folder, name + ".json")) as f:
        return json.load(f)


def _analysis_main(argv):
    """On each pool rank: the tool's main()."""
    analysis.main(argv)


def test_cli_one_process_with_compare_then_two_ranks(process_group, keep_group, gloo_pool, image_folder, tmp_path,
                                                      capsys):
    a = write_checkpoint(str(tmp_path / "modelA" / "last.pt"), image_folder, 0)
    b = write_checkpoint(str(tmp_path / "modelB" / "last.pt"), image_folder, 1)
    try:
        import matplotlib  # noqa: F401
        plot = "true"
    except ImportError:
        plot = "false"
    common = ["--num_workers", "0", "--batch_size", "5", "--device", "cpu", "--num_images", "24", "--chunk", "7",
              "--plot", plot]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    analysis.main(["--checkpoint", a, "--compare", b, "--output_dir", one] + common)  # this process
    printed = capsys.readouterr().out
    assert "modelA: per-layer Eq. 7-9" in printed and "cka_cross: linear CKA" in printed
    m = read(one, "metrics")
    assert m["layers"] == [1, 2] and m["num_images"] == 24 and list(m["rows"]) == ["modelA", "modelB"]
    for rows in m["rows"].values():
        for r in rows:
            assert 0 < r["alignment"] < 4 and -8 < r["uniformity"] < 0 and 0 < r["neg_alignment"] <= 4
            assert r["uni_ali_ratio"] == pytest.approx(-r["uniformity"] / r["alignment"])
            assert r["ali_ratio"] == pytest.approx(r["neg_alignment"] / r["alignment"])
    assert m["rows"]["modelA"] != m["rows"]["modelB"]
    cka, cross = read(one, "cka"), read(one, "cka_cross")
    assert cross["rows_of"] == "modelA" and cross["cols_of"] == "modelB"
    assert all(cka["cka"][i][i] == pytest.approx(1.0) for i in range(2))
    assert cka["cka"][0][1] == pytest.approx(cka["cka"][1][0])  # symmetric
    assert all(0 <= v <= 1 + 1e-9 for row in cross["cka"] for v in row) and cross["cka"][1][1] < 0.999
    if plot == "true":
        for name in ("metrics", "cka", "cka_compare", "cka_cross"):
            assert os.path.getsize(os.path.join(one, name + ".png")) > 1000
    # Two ranks, model A against itself: the same views (seeded per image), so the same numbers as one process.
    gloo_pool.run(_analysis_main, ["--checkpoint", a, "--compare", a, "--output_dir", two] + common)
    m2 = read(two, "metrics")
    assert list(m2["rows"]) == ["modelA", "modelA (compare)"]
    for r1, r2 in zip(m["rows"]["modelA"], m2["rows"]["modelA"]):
        assert r2 == pytest.approx(r1, rel=1e-6)
    for name in ("cka", "cka_cross"):  # model A against itself: the cross matrix is A's own
        assert torch.allclose(torch.tensor(read(two, name)["cka"]), torch.tensor(cka["cka"]), rtol=1e-5)
