"""IPOT word-patch alignment against an exact transport solver; masking; gradient through the cost only."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from vlm_lab.losses import cosine_cost, ipot, transport_distance, wpa_loss


def _exact_ot(cost: np.ndarray) -> float:
    """Exact OT between uniform masses with scipy's linear programme."""
    m, n = cost.shape
    a_eq = np.zeros((m + n, m * n))
    for i in range(m):
        a_eq[i, i * n:(i + 1) * n] = 1
    for j in range(n):
        a_eq[m + j, j::n] = 1
    b_eq = np.concatenate([np.full(m, 1 / m), np.full(n, 1 / n)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.success
    return float(res.fun)


def test_ipot_square_problem_matches_assignment():
    torch.manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
        c = cosine_cost(x, y)
        ones = torch.ones(1, 6)
        plan = ipot(c, ones, ones, iterations=200)
        rows, cols = linear_sum_assignment(c[0].numpy())
        exact = c[0].numpy()[rows, cols].sum() / 6  # a permutation with mass 1/6 each is optimal
        assert abs(float((plan * c).sum()) - exact) < 2e-3


def test_ipot_rectangular_padded_problem_matches_linprog_and_has_no_mass_on_padding():
    torch.manual_seed(1)
    b, m, n = 3, 7, 9
    x, y = torch.randn(b, m, 5), torch.randn(b, n, 5)
    xv = torch.ones(b, m, dtype=torch.long)
    yv = torch.ones(b, n, dtype=torch.long)
    xv[1, 4:] = 0
    yv[2, 5:] = 0
    xv[:, 0] = 0  # e.g. [CLS]
    dist, plan = transport_distance(x, y, xv, yv, iterations=300)
    cost = cosine_cost(x, y)
    for i in range(b):
        rows, cols = xv[i].bool().numpy(), yv[i].bool().numpy()
        exact = _exact_ot(cost[i].numpy()[rows][:, cols])
        assert abs(dist[i].item() - exact) < 3e-3
        p = plan[i]
        assert p[~xv[i].bool()].abs().sum() == 0 and p[:, ~yv[i].bool()].abs().sum() == 0
        assert torch.allclose(p.sum(1)[xv[i].bool()], torch.full((int(rows.sum()),), 1 / rows.sum()), atol=1e-3)
        assert torch.allclose(p.sum(0)[yv[i].bool()], torch.full((int(cols.sum()),), 1 / cols.sum()), atol=1e-3)


def test_vilt_defaults_marginals_after_50_iterations():
    torch.manual_seed(2)
    x, y = torch.randn(2, 10, 16), torch.randn(2, 17, 16)
    _, plan = transport_distance(x, y, torch.ones(2, 10), torch.ones(2, 17))  # beta 0.5, 50 iterations, k 1
    assert torch.allclose(plan.sum(1), torch.full((2, 17), 1 / 17), atol=2e-3)
    assert torch.allclose(plan.sum(2), torch.full((2, 10), 1 / 10), atol=2e-3)


def test_gradient_flows_through_the_cost_only():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, requires_grad=True)
    y = torch.randn(2, 5, 6, requires_grad=True)
    xv, yv = torch.ones(2, 4), torch.ones(2, 5)
    dist, plan = transport_distance(x, y, xv, yv)
    assert not plan.requires_grad
    dist.sum().backward()
    # expected gradient: d/dx sum(C * T) with T held constant
    x2, y2 = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    (cosine_cost(x2, y2) * plan).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(y.grad, y2.grad, atol=1e-6)


def test_wpa_loss_sign_weight_and_fp32_under_autocast():
    torch.manual_seed(4)
    x, y = torch.randn(4, 5, 8), torch.randn(4, 6, 8)
    xv, yv = torch.ones(4, 5), torch.ones(4, 6)
    match = torch.tensor([1, 0, 1, 0])
    dist, _ = transport_distance(x, y, xv, yv)
    expected = 0.1 * (dist[[0, 2]].sum() - dist[[1, 3]].sum()) / 4
    assert torch.allclose(wpa_loss(x, y, xv, yv, match), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wpa_loss(x.bfloat16(), y.bfloat16(), xv, yv, match)
    assert out.dtype == torch.float32
    # identical token sets have (nearly) zero transport distance
    d0, _ = transport_distance(x, x, xv, xv, iterations=200)
    assert d0.abs().max() < 1e-2


def test_bad_input():
    with pytest.raises(ValueError, match="x_valid"):
        ipot(torch.rand(1, 3, 4), torch.ones(1, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="valid position"):
        ipot(torch.rand(1, 3, 4), torch.zeros(1, 3), torch.ones(1, 4))
