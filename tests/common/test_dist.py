"""common/dist.py: two gloo ranks (the session's pool) against one process on the whole batch (gather_with_grad's
gradient, the all-reduced meter, distributed feature extraction, gather_uneven), the per-rank batch, per-rank
seeding."""
import pytest
import torch
import torch.nn as nn

from common import data, dist, log
from common.config import ConfigError
from eval.knn import extract
from simclr import simclr_loss

N, D_IN, D_OUT = 6, 5, 4  # per-rank batch 3 x 2 ranks


def make_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)


def make_model():
    torch.manual_seed(1)
    return nn.Linear(D_IN, D_OUT)


class Points(torch.utils.data.Dataset):
    """7 labeled 'images' whose feature is their own index: extraction order is easy to check."""

    def __len__(self):
        return 7

    def __getitem__(self, i):
        return torch.tensor([float(i), 1.0]), i % 3


def _two_rank_step():
    """On each pool rank: its half of the batch through DDP and the loss, a meter, feature extraction, gather_uneven."""
    ctx = dist.setup("cpu")
    rank = ctx.rank
    x1, x2 = make_batch()
    part = slice(rank * N // 2, (rank + 1) * N // 2)
    model = make_model()
    model_ddp = dist.ddp(model, ctx)
    loss = simclr_loss(model_ddp(x1[part]), model_ddp(x2[part]), 0.3)
    loss.backward()
    meter = log.Meter()
    for v in ([1.0, 2.0] if rank == 0 else [3.0, 4.0, 5.0]):
        meter.update(torch.tensor(v), step=0)
    feats, labels = extract(nn.Identity(), data.eval_loader(Points(), 2, ctx, 0), ctx, unit_norm=False)
    uneven = dist.gather_uneven(torch.arange(rank + 2))
    return {"grad": [p.grad for p in model.parameters()], "loss": loss.detach(), "meter": meter.global_avg(),
            "feats": feats[0], "labels": labels, "uneven": uneven}


def test_two_ranks_equal_one_process(process_group, gloo_pool):
    outs = gloo_pool.run(_two_rank_step)
    # One process, whole batch: the loss is the mean over all 2N anchors.
    x1, x2 = make_batch()
    model = make_model()
    loss = simclr_loss(model(x1), model(x2), 0.3)
    loss.backward()
    for out in outs:
        # DDP averages the ranks' gradients; gather_with_grad sends every rank's gradient back to the owner of each
        # slice: together that is exactly the full-batch gradient.
        for ours, full in zip(out["grad"], model.parameters()):
            torch.testing.assert_close(ours, full.grad, rtol=1e-5, atol=1e-6)
        assert out["meter"] == 3.0  # (1+2+3+4+5)/5 over both ranks
        assert out["feats"][:, 0].tolist() == list(range(7)) and out["labels"].tolist() == [i % 3 for i in range(7)]
        assert out["uneven"].tolist() == [0, 1, 0, 1, 2]
    # Each rank's loss is the mean over its own anchors; their average is the full-batch loss.
    mean = sum(out["loss"] for out in outs) / 2
    torch.testing.assert_close(mean, loss.detach(), rtol=1e-5, atol=1e-6)


def test_per_rank_batch_errors():
    assert dist.per_rank(8, 2) == 4
    with pytest.raises(ConfigError, match="does not divide across 3 ranks"):
        dist.per_rank(8, 3)
    with pytest.raises(ConfigError, match="must be positive"):
        dist.per_rank(-8, 1)


def test_per_rank_seeding_gives_each_rank_its_own_views_and_shard():
    """data.seed_epoch(loader, seed, epoch, rank), as every script calls it: two ranks draw different augmentations
    and disjoint shards, the same rank and epoch draws the same again (bit-exact resume), the next epoch differs."""
    from common import augment, batch_augment, data
    images = data.fake_set("train").images[:16]
    recipe = augment.simclr_recipe(32, 0.5, blur=False)

    def draw(rank, epoch):
        loader = data.train_loader(data.fake_set("train"), 8, dist.Context(rank, rank, 2, torch.device("cpu")), 0,
                                   seed=0)
        data.seed_epoch(loader, 0, epoch, rank)
        return batch_augment.augment_batch(images, recipe), list(loader.sampler)

    (v0, s0), (v1, s1) = draw(0, 0), draw(1, 0)
    assert not torch.equal(v0, v1) and not set(s0) & set(s1)
    again, shard = draw(0, 0)
    assert torch.equal(again, v0) and shard == s0
    assert not torch.equal(draw(0, 1)[0], v0)
