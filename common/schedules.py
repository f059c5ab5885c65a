"""Schedules as pure functions of the global step (no lr_scheduler objects: nothing to checkpoint).

Applied at the top of every iteration to the learning rate, weight decay, EMA momentum, loss
weights...
"""
import math


def cosine(step, total_steps, base, final=0.0, warmup_steps=0, warmup_start=0.0):
    """Linear warmup from `warmup_start` to `base` over `warmup_steps`, then cosine from `base` to
    `final`."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    t = min(step - warmup_steps, total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def ema_momentum(step, total_steps, m0):
    """BYOL / MoCo v3 momentum: m = 1 - (1 - m0) * (1 + cos(pi t / T)) / 2, from m0 at t = 0 to 1 at
    t = T."""
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)) / 2.0


def ramp_up(step, total_steps, final):
    """Cosine ramp from 0 to `final` (SDSSL's alpha: cosine_scheduler(0, ratio))."""
    return cosine(step, total_steps, base=0.0, final=final)


def step_decay(epoch, milestones, base, factor=0.1):
    """`base * factor**k`, k = number of milestones already passed (RepDistiller: x0.1 after 150,
    180, 210)."""
    return base * factor ** sum(epoch >= m for m in milestones)
