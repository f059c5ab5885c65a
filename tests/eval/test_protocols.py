"""Evaluating as each paper did: which network (`--which auto`), ResNet stages as layers, DINO's concatenated
features, top-5, the protocol YAMLs of configs/eval/, and every command of the README's protocol block run on tiny
checkpoints."""
import json
import os
import shlex

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint
from common.config import parse
from common.models import build_model
from helpers import ROOT, run_script
from eval import analysis, knn, linear
from eval.knn import feature_dims, features, knn_classify, num_layers, select_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_checkpoint(path, arch, data_dir, evaluate="model"):
    """A last.pt as the training scripts write it: `model` and `teacher` with different backbones."""
    states = {}
    for seed, name in enumerate(("model", "teacher")):
        torch.manual_seed(seed)
        states[name] = nn.Module()
        states[name].backbone = build_model(arch, image_size=32, patch_size=8)
    cfg = dict(arch=arch, image_size=32, patch_size=8, num_heads=0, dataset="imagefolder", data_dir=data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    checkpoint.save(path, 1, 2, cfg, evaluate, **states)
    return states


# ----------------------------------------- which network -----------------------------------------

def test_which_auto_loads_what_the_checkpoint_names(image_folder, tmp_path):
    path = str(tmp_path / "sd" / "last.pt")
    states = tiny_checkpoint(path, "vit_debug", image_folder, evaluate="teacher")
    for which, name in (("auto", "teacher"), ("teacher", "teacher"), ("model", "model")):
        backbone, _, resolved = checkpoint.load_backbone(path, which)
        assert resolved == name
        for k, v in backbone.state_dict().items():
            assert torch.equal(v, states[name].backbone.state_dict()[k])
    with pytest.raises(ValueError, match="names no saved state"):
        checkpoint.save(str(tmp_path / "x.pt"), 1, 2, {}, "teacher", model=states["model"])


def test_sdssl_mocov3_checkpoint_is_evaluated_on_its_teacher(process_group, image_folder, tmp_path, keep_group):
    """A real SD-MoCo v3 run stores evaluate=teacher and exports both backbones; `eval.knn` (default --which auto)
    then reports the teacher, and its numbers are the teacher's, not the student's. MoCo v3 evaluates the student."""
    out = str(tmp_path / "sd")
    tiny = ["--dataset", "imagefolder", "--data_dir", image_folder, "--arch", "vit_debug", "--patch_size", "8",
            "--image_size", "32", "--batch_size", "8", "--epochs", "1", "--max_steps_per_epoch", "2", "--device",
            "cpu", "--num_workers", "0", "--eval_every", "0", "--proj_hidden_dim", "16", "--isd_hidden_dim", "16",
            "--pred_hidden_dim", "16", "--proj_dim", "8", "--lr", "0.05"]
    run_script("sdssl", tiny + ["--output_dir", out])  # one process, this one
    blob = checkpoint.load(os.path.join(out, "last.pt"))
    assert blob["evaluate"] == "teacher"
    teacher_backbone = torch.load(os.path.join(out, "teacher_backbone.pt"), weights_only=True)
    student_backbone = torch.load(os.path.join(out, "backbone.pt"), weights_only=True)
    assert all(torch.equal(v, blob["teacher"]["backbone." + k]) for k, v in teacher_backbone.items())
    assert all(torch.equal(v, blob["model"]["backbone." + k]) for k, v in student_backbone.items())
    results = {}
    for which in ("auto", "teacher", "model"):
        path = str(tmp_path / f"{which}.json")
        knn.main(["--checkpoint", os.path.join(out, "last.pt"), "--which", which, "--device", "cpu", "--num_workers",
                  "0", "--k", "1", "3", "--json", path])
        results[which] = json.load(open(path))
    assert results["auto"]["which"] == "teacher"
    assert results["auto"]["rows"] == results["teacher"]["rows"]
    # the tiny networks differ after two steps, so their features (and cosine votes) do: check on the features
    t, _, _ = checkpoint.load_backbone(os.path.join(out, "last.pt"), "auto")
    s, _, _ = checkpoint.load_backbone(os.path.join(out, "last.pt"), "model")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(t.eval()(x), s.eval()(x))



# ------------------------------------- layers: ViT blocks, ResNet stages -------------------------------------

def test_resnet_stage_features_are_the_pooled_stage_outputs():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    r18 = build_model("resnet18", image_size=32).eval()
    f = features(r18, x, [1, 2, 3, 4])
    stages = r18.forward_stages(x)
    assert [t.shape[1] for t in f] == [64, 128, 256, 512] == feature_dims(r18, 32, [1, 2, 3, 4])
    for got, m in zip(f, stages):
        assert torch.allclose(got, F.adaptive_avg_pool2d(m, 1).flatten(1))
    assert torch.allclose(f[3], r18(x), atol=1e-6)  # the last stage is the backbone's own pooled output
    zoo = build_model("resnet20").eval()
    f = features(zoo, x, [1, 2, 3])
    assert [t.shape[1] for t in f] == [16, 32, 64]
    assert torch.allclose(f[2], zoo(x), atol=1e-6)
    assert features(zoo, x, [2])[0].shape == (3, 32)


@pytest.mark.parametrize("name, widths", [("wrn_16_1", [16, 32, 64]), ("vgg8", [128, 256, 512, 512]),
                                          ("MobileNetV2", [12, 16, 48, 160]), ("ShuffleV2", [116, 232, 464])])
def test_every_cifar_zoo_family_has_its_stages_as_layers(name, widths):
    """--layer all on a headless zoo backbone: one pooled feature per stage after the stem (Features.stages[1:])."""
    backbone = build_model(name, image_size=28).eval()
    assert num_layers(backbone) == len(widths)
    f = features(backbone, torch.randn(2, 3, 28, 28), select_layers(backbone, "all"))
    assert [t.shape[1] for t in f] == widths


def test_dino_features_concatenate_the_last_cls_tokens_and_the_mean_patch_token():
    torch.manual_seed(0)
    vit = build_model("vit_mini", image_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    _, tokens = vit.forward_intermediates(x, norm=True)
    (four,) = features(vit, x, n_last_blocks=4)
    assert four.shape == (2, 4 * 128)
    assert torch.equal(four, torch.cat([tokens[i][:, 0] for i in (2, 3, 4, 5)], dim=1))
    assert torch.allclose(four[:, -128:], vit(x), atol=1e-6)  # the last of them is the usual feature
    (base,) = features(vit, x, n_last_blocks=1, avgpool_patchtokens=True)
    assert torch.equal(base, torch.cat([tokens[5][:, 0], tokens[5][:, 1:].mean(1)], dim=1))
    assert feature_dims(vit, 32, n_last_blocks=4) == [512] and feature_dims(vit, 32, avgpool_patchtokens=True) == [256]


# ------------------------------------------------ top-5 ------------------------------------------------

def test_knn_top5_counts_a_class_among_the_five_most_voted():
    # 6 classes; the test point's nearest neighbours vote 3 x class 0, 2 x class 1, then one each for 2..5
    train_y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 5])
    sims = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.5, 0.4, 0.3, 0.2])
    train_f = torch.stack([sims, (1 - sims ** 2).sqrt()], dim=1)
    test_f = torch.tensor([[1.0, 0.0]])
    for label, top1, top5 in ((0, 1, 1), (1, 0, 1), (4, 0, 1), (5, 0, 0)):
        c = knn_classify(train_f, train_y, test_f, torch.tensor([label]), ks=(9,), temperature=0.1)[9]
        assert c.tolist() == [top1, top5], label


def test_linear_accuracy_reports_top1_and_top5():
    head = linear.Heads([nn.Linear(6, 6, bias=False)])
    with torch.no_grad():
        head[0].weight.copy_(torch.eye(6))
    feats = torch.tensor([[6.0, 5, 4, 3, 2, 1]])  # ranking of classes: 0, 1, 2, 3, 4, then 5
    assert linear.accuracy(head, [feats], torch.tensor([0]))[0] == [1.0, 1.0]
    assert linear.accuracy(head, [feats], torch.tensor([4]))[0] == [0.0, 1.0]
    assert linear.accuracy(head, [feats], torch.tensor([5]))[0] == [0.0, 0.0]


# ----------------------------------------- transforms and optimisers -----------------------------------------

def test_square_resize_and_bicubic_match_torchvision():
    from PIL import Image
    import torchvision.transforms as T
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(300, 400, 3, generator=g) * 255).to(torch.uint8).numpy())  # not square
    finish = [T.ToTensor(), T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)]
    square = T.Compose([T.Resize((256, 256)), T.CenterCrop(224)] + finish)(img)
    short = T.Compose([T.Resize(256), T.CenterCrop(224)] + finish)(img)
    bicubic = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)] + finish)(img)
    assert torch.equal(augment.eval_transform(224, resize="square")(img), square)
    assert torch.equal(augment.eval_transform(224)(img), short)
    assert torch.equal(augment.eval_transform(224, interpolation="bicubic")(img), bicubic)
    assert not torch.allclose(square, short) and not torch.allclose(short, bicubic)


def test_lars_probe_adapts_weight_and_bias_like_apex_larc():
    """SimSiam's main_lincls.py wraps SGD in apex LARC (trust 0.001, clip False): every parameter's gradient is scaled
    by 0.001 |w| / |g| (1 while |w| is 0, as the zero-initialised bias at the first step)."""
    torch.manual_seed(0)
    heads = linear.Heads([nn.Linear(4, 3)])
    nn.init.normal_(heads[0].bias)
    cfg = linear.Config(optimizer="lars", lr=0.1, batch_size=256)
    opt = linear.build_optimizer(heads, cfg, lr=1.0)
    before = [p.detach().clone() for p in heads.parameters()]
    loss = F.cross_entropy(heads([torch.randn(5, 4)])[0], torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    grads = [p.grad.clone() for p in heads.parameters()]
    opt.step()
    for p, w, g in zip(heads.parameters(), before, grads):
        assert torch.allclose(w - p.detach(), 0.001 * w.norm() / g.norm() * g, rtol=1e-3)  # float32 differences


# --------------------------------------------- the protocol YAMLs ---------------------------------------------

PROTOCOLS = {  # file: (tool, values that must hold: the papers' and the authors' code's constants)
    "knn_dino": (knn, dict(k=[10, 20, 100, 200], temperature=0.07, resize="short")),
    "knn_gsg": (knn, dict(k=[200], temperature=0.2, resize="square")),
    "knn_lightly_cifar": (knn, dict(k=[200], temperature=0.1)),
    "knn_msbreg": (knn, dict(k=[5, 20, 200], temperature=0.07)),
    "linear_mocov3_resnet": (linear, dict(mode="full", optimizer="sgd", epochs=90, batch_size=1024, lr=0.1,
                                          weight_decay=0.0)),
    "linear_mocov3_vit": (linear, dict(mode="full", optimizer="sgd", epochs=90, batch_size=1024, lr=3.0)),
    "linear_dino_vit_small": (linear, dict(mode="full", epochs=100, batch_size=1024, lr=0.001, n_last_blocks=4,
                                           avgpool_patchtokens=False, interpolation="bicubic")),
    "linear_dino_vit_base": (linear, dict(n_last_blocks=1, avgpool_patchtokens=True, interpolation="bicubic")),
    "linear_simsiam": (linear, dict(mode="full", optimizer="lars", epochs=90, batch_size=4096, lr=0.1,
                                    weight_decay=0.0)),
}


def test_protocol_yamls_hold_the_papers_constants():
    folder = os.path.join(ROOT, "configs", "eval")
    assert sorted(f[:-5] for f in os.listdir(folder)) == sorted(PROTOCOLS)
    for name, (tool, expected) in PROTOCOLS.items():
        cfg = parse(tool.Config, ["--config", os.path.join(folder, name + ".yaml")])
        assert {k: getattr(cfg, k) for k in expected} == expected, name


# ------------------------------------- the README's commands, on tiny checkpoints -------------------------------------

def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("### Evaluating as each paper did")[1].split("```bash")[1].split("```")[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("python -m eval.")]


def test_readme_lists_a_command_for_every_table():
    text = open(os.path.join(ROOT, "README.md")).read().split("### Evaluating as each paper did")[1].split("```\n")[0]
    for table in ("SDSSL Table 1", "SDSSL Fig. 3", "SDSSL Fig. 6-8", "SDSSL Table 7", "MSBReg Table 1",
                  "MSBReg Table 12", "GSG", "MoCo v3's linear protocol"):
        assert table in text
    assert len(readme_commands()) >= 14


@pytest.mark.sweep
@pytest.mark.parametrize("argv", readme_commands(), ids=[f"{i}-{a[2]}" for i, a in enumerate(readme_commands())])
def test_readme_protocol_command_runs_on_a_tiny_checkpoint(argv, image_folder, tmp_path, keep_group):
    """The command as the README gives it, with its checkpoint replaced by a tiny one of the same family (a ViT deep
    enough for DINO's 4 blocks, or a ResNet-18), and only sizes made small: batch, epochs, images."""
    tool = {"eval.knn": knn, "eval.linear": linear, "eval.analysis": analysis}[argv[2]]
    args = argv[3:]
    for flag in ("--checkpoint", "--compare"):
        if flag in args:
            i = args.index(flag) + 1
            vit = "vit" in args[i]
            path = str(tmp_path / flag.strip("-") / "last.pt")
            tiny_checkpoint(path, "vit_mini" if vit else "resnet18", image_folder,
                            "teacher" if "sdssl_mocov3" in args[i] else "model")
            args[i] = path
    try:
        import matplotlib  # noqa: F401
        can_plot = True
    except ImportError:
        can_plot = False
    if "--plot" in args:  # a PNG where matplotlib is installed; without it, the flag is left out
        i = args.index("--plot")
        if can_plot:
            args[i + 1] = str(tmp_path / "plot.png")
        else:
            del args[i:i + 2]
    if "--output_dir" in args:
        args[args.index("--output_dir") + 1] = str(tmp_path / "out")
    small = {knn: ["--batch_size", "16"],
             linear: ["--batch_size", "16", "--epochs", "1"],
             analysis: ["--batch_size", "16", "--num_images", "12", "--plot", "false"]}[tool]
    result = str(tmp_path / "result.json")
    json_flag = ["--json", result] if tool is not analysis else []
    tool.main(args + small + json_flag + ["--device", "cpu", "--num_workers", "0"])
    if tool is analysis:
        metrics = json.load(open(tmp_path / "out" / "metrics.json"))
        assert len(metrics["layers"]) == (6 if vit else 4)
        return
    rows = json.load(open(result))["rows"]
    layers = 4 if "--layer" in args and not vit else 6 if "--layer" in args else 1
    assert len(rows) == layers and all(0 <= v <= 100 for r in rows for v in r.values())
    if tool is knn:
        assert any(k.endswith("top-5") for k in rows[0])
