
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
