
import pytest
import torch
import torch.nn as nn

from common import optim, schedules


def test_cosine_warmup_and_endpoints():
    assert schedules.cosine(0, 100, 1.0, warmup_steps=10) == 0.0
    assert schedules.cosine(5, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert schedules.cosine(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert schedules.cosine(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert schedules.cosine(100, 100, 1.0, final=0.1, warmup_steps=10) == pytest.approx(0.1)
    assert schedules.cosine(0, 100, 2.0) == 2.0
    vals = [schedules.cosine(s, 100, 1.0, warmup_steps=10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_ema_momentum_endpoints():
    assert schedules.ema_momentum(0, 1000, 0.996) == pytest.approx(0.996)
    assert schedules.ema_momentum(1000, 1000, 0.996) == pytest.approx(1.0)
    assert schedules.ema_momentum(500, 1000, 0.99) == pytest.approx(0.995)


def test_ramp_up_and_step_decay():
    assert schedules.ramp_up(0, 10, 0.8) == 0.0 and schedules.ramp_up(10, 10, 0.8) == pytest.approx(0.8)
    assert [schedules.step_decay(e, (150, 180, 210), 0.05) for e in (0, 149, 150, 180, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.0005, 0.00005])


def test_param_groups_split_bias_and_norm():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2, bias=False))
    decay, no_decay = optim.param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(8, 4), (2, 8)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0 and no_decay["lars_exclude"]
    (everything,) = optim.param_groups(model, 0.1, exclude_bias_norm=False)
    assert len(everything["params"]) == 5


def test_lars_matches_hand_computation():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, requires_grad=True)
    groups = [dict(params=[w], weight_decay=0.01, lars_exclude=False),
              dict(params=[b], weight_decay=0.0, lars_exclude=True)]
    opt = optim.LARS(groups, lr=0.5, momentum=0.9, eta=0.001)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.01 * w0
    expected = w0 - 0.5 * (0.001 * w0.norm() / d.norm()) * d
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # excluded: plain momentum SGD, no decay
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()  # the momentum buffer carries: second update = 0.9 * first + new
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb))


def test_set_lr_wd_respects_fixed_lr_and_no_decay_group():
    model = nn.Linear(4, 2)
    groups = optim.param_groups(model, 0.1)
    groups.append(dict(params=[nn.Parameter(torch.zeros(2, 2))], weight_decay=0.1, base_wd=0.1, fixed_lr=True, lr=0.05))
    opt = optim.build_optimizer("sgd", groups, lr=0.0)
    optim.set_lr_wd(opt, 1.0, wd=0.2)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0, 0.05]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0, 0.2]


def test_unknown_optimizer():
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="unknown optimizer"):
        optim.build_optimizer("adam", optim.param_groups(nn.Linear(2, 2), 0.0), lr=0.1)


def test_lars_clip_caps_the_local_rate_at_the_global_one():
    w = torch.nn.Parameter(torch.full((4,), 10.0))
    opt = optim.LARS([dict(params=[w], weight_decay=0.0, lars_exclude=False)], lr=0.1, momentum=0.0, eta=0.02,
                     clip=True)
    w.grad = torch.full((4,), 0.01)  # trust = 0.02 * 20 / 0.02 = 20 > lr: clipped to trust / lr = 1 -> plain SGD step
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), 10.0 - 0.1 * 0.01))
    w2 = torch.nn.Parameter(torch.full((4,), 10.0))
    opt2 = optim.LARS([dict(params=[w2], weight_decay=0.0, lars_exclude=False)], lr=0.1, momentum=0.0, eta=0.02)
    w2.grad = torch.full((4,), 0.01)
    opt2.step()  # without clipping the update is lr * trust * g = 0.1 * 20 * 0.01
    torch.testing.assert_close(w2.detach(), torch.full((4,), 10.0 - 0.1 * 20 * 0.01))


# ----- LARS on torch._foreach_* kernels (#25): the per-tensor loop it replaced is the oracle -----

@torch.no_grad()
def lars_loop_step(groups, state):
    """The per-tensor LARS step that common/optim.py had before the foreach kernels (the oracle)."""
    for g in groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            dp = p.grad
            if not g["lars_exclude"]:
                dp = dp.add(p, alpha=g["weight_decay"])
                w_norm, g_norm = torch.norm(p), torch.norm(dp)
                trust = torch.where((w_norm > 0) & (g_norm > 0), g["eta"] * w_norm / g_norm, 1.0)
                if g["clip"] and g["lr"] > 0:
                    trust = torch.clamp(trust / g["lr"], max=1.0)
                dp = dp.mul(trust)
            if p not in state:
                state[p] = torch.zeros_like(p)
            p.add_(state[p].mul_(g["momentum"]).add_(dp), alpha=-g["lr"])


def lars_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 2))
    with torch.no_grad():
        model[5].weight.zero_()  # |w| = 0: trust 1
    return model


@pytest.mark.parametrize("clip", [False, True])
def test_lars_equals_the_per_tensor_loop_bit_for_bit(clip):
    """Five steps with weight decay, momentum, an excluded group, a parameter without a gradient
    (left alone, no state), zero gradients in both groups and zero weights (|w| = 0: trust 1): every
    parameter and momentum buffer equals the per-tensor loop's to the last bit, with lr and wd
    changed between steps as the schedules do."""
    ours, ref = lars_model(0), lars_model(0)
    opt = optim.LARS(optim.param_groups(ours, 1e-4), lr=0.0, momentum=0.9, eta=0.02, clip=clip)
    ref_groups = optim.param_groups(ref, 1e-4)
    for g in ref_groups:
        g.update(momentum=0.9, eta=0.02, clip=clip)
    ref_state = {}
    for step in range(5):
        lr, wd = 0.3 * (step + 1), 1e-4 * (1 + step)
        optim.set_lr_wd(opt, lr, wd)
        for g in ref_groups:
            g["lr"], g["weight_decay"] = lr, (wd if g["base_wd"] > 0 else 0.0)
        grads = [torch.randn_like(p) for p in ours.parameters()]
        grads[-1] = None  # the last bias: no gradient
        grads[3] = torch.zeros_like(grads[3])  # the BatchNorm bias (excluded group): zero gradient
        grads[6] = torch.zeros_like(grads[6])  # the bias-free Linear (decay group): zero gradient
        for model in (ours, ref):
            for p, gr in zip(model.parameters(), grads):
                p.grad = None if gr is None else gr.clone()
        opt.step()
        lars_loop_step(ref_groups, ref_state)
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (step, name)
            if b in ref_state:
                assert torch.equal(opt.state[a]["momentum_buffer"], ref_state[b]), (step, name)
            else:
                assert "momentum_buffer" not in opt.state[a], name
    assert not torch.equal(ours[5].weight, torch.zeros_like(ours[5].weight))  # it did move


def test_lars_step_is_sync_free_with_a_fixed_op_count():
    """No host synchronisation in a step, and a number of ops per group that does not grow with the
    number of tensors (the per-tensor loop dispatched about 13 ops per decayed tensor)."""
    from helpers import HostSyncCounter
    counts = []
    for depth in (2, 8):
        blocks = [nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(depth)]
        model = nn.Sequential(*blocks)
        opt = optim.LARS(optim.param_groups(model, 1e-4), lr=0.1)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # the first step creates the momentum buffers
        with HostSyncCounter() as sync:
            opt.step()
        assert sync.count == 0, sync.report()
        counts.append(sync.total_ops)
    assert counts[0] == counts[1] < 30, counts
