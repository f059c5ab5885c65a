"""Each script's loss against a naive loop-based reference (value and gradient, float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from simclr import simclr_loss


# ----- SimCLR -----

def naive_nt_xent(z1, z2, tau):
    """SimCLR Eq. 1 written out: for each of the 2N anchors, -log(exp(s_pos/tau) / sum_{k != i} exp(s_ik/tau))."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / tau for k in range(2 * n)]
        denom = sum(torch.exp(s) for k, s in enumerate(sims) if k != i)
        total = total - torch.log(torch.exp(sims[pos]) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("n, tau", [(1, 0.5), (5, 0.1), (8, 1.0)])
def test_simclr_loss_matches_reference(process_group, n, tau):
    torch.manual_seed(n)
    z1 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    ours, ref = simclr_loss(z1, z2, tau), naive_nt_xent(z1, z2, tau)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [z1, z2]), torch.autograd.grad(ref, [z1, z2])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_simclr_loss_analytic_cases(process_group):
    # Identical views, mutually orthogonal images: positive similarity 1, negatives 0 (and one more positive copy).
    z = torch.eye(4)
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 6 * math.exp(0)))
    assert simclr_loss(z, z, tau).item() == pytest.approx(expected, rel=1e-6)
    # Scale invariance (inputs are normalised inside) and symmetry in the two views.
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    torch.testing.assert_close(simclr_loss(a, b, 0.2), simclr_loss(3 * a, b, 0.2))
    torch.testing.assert_close(simclr_loss(a, b, 0.2), simclr_loss(b, a, 0.2))
