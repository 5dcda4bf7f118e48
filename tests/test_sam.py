"""SAM and adaptive SAM around torch and cl_cm optimizers."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from cl_cm import SAM, AdamCM


def quadratic(a: torch.Tensor):
    x = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def loss():
        return 0.5 * (a * x * x).sum()

    return x, loss


def closure_of(opt, loss):
    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    return closure


def test_sgd_step_uses_the_gradient_at_the_perturbed_point():
    a = torch.tensor([1.0, 3.0, 0.5])
    x, loss = quadratic(a)
    x0 = x.detach().clone()
    opt = SAM([x], torch.optim.SGD, rho=0.1, lr=0.2)
    returned = opt.step(closure_of(opt, loss))
    g = a * x0
    e = 0.1 * g / g.norm()
    expected = x0 - 0.2 * a * (x0 + e)
    torch.testing.assert_close(x.detach(), expected)
    assert float(returned.detach()) == pytest.approx(float(0.5 * (a * x0 * x0).sum()))


def test_first_step_moves_by_rho_and_second_step_restores_exactly():
    a = torch.tensor([1.0, 3.0, 0.5])
    x, loss = quadratic(a)
    x0 = x.detach().clone()
    opt = SAM([x], AdamCM, rho=0.3, lr=0.0)
    loss().backward()
    opt.first_step(zero_grad=True)
    assert float((x.detach() - x0).norm()) == pytest.approx(0.3, rel=1e-6)
    assert x.grad is None
    loss().backward()
    opt.second_step()
    assert torch.equal(x.detach(), x0), "lr = 0: θ comes back bit for bit"


def test_adaptive_sam_perturbation():
    a = torch.tensor([1.0, 3.0, 0.5])
    x, loss = quadratic(a)
    x0 = x.detach().clone()
    opt = SAM([x], torch.optim.SGD, rho=0.5, adaptive=True, lr=0.0)
    loss().backward()
    g = x.grad.clone()
    opt.first_step()
    t = x0.abs()
    expected = 0.5 * t * t * g / (t * g).norm()
    torch.testing.assert_close(x.detach() - x0, expected)


def test_rho_zero_is_the_base_optimizer():
    torch.manual_seed(0)
    a = nn.Linear(5, 2)
    b = nn.Linear(5, 2)
    b.load_state_dict(a.state_dict())
    sam = SAM(a.parameters(), AdamCM, rho=0.0, lr=1e-2)
    base = AdamCM(b.parameters(), lr=1e-2)
    for t in range(10):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(t))
        sam.step(closure_of(sam, lambda: a(x).pow(2).mean()))
        base.step(closure_of(base, lambda: b(x).pow(2).mean()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_adam_cm_sam_fills_the_base_buffer_and_shares_state():
    x, loss = quadratic(torch.tensor([1.0, 3.0, 0.5]))
    opt = SAM([x], AdamCM, rho=0.05, lr=1e-2, buffer_size=3)
    for _ in range(4):
        opt.step(closure_of(opt, loss))
    assert opt.base_optimizer.buffer_stats()["size"] == 3
    assert opt.state is opt.base_optimizer.state
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["buffer_size"] == 3
    opt.state = defaultdict(dict)  # what Avalanche's reset does
    assert len(opt.base_optimizer.state) == 0


def test_misuse_gives_clear_errors():
    x, loss = quadratic(torch.tensor([1.0, 3.0, 0.5]))
    opt = SAM([x], AdamCM)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    loss().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="second_step"):
        opt.state_dict()
    loss().backward()
    opt.step()  # completes the pending first_step
    assert opt.state_dict()["state"][0]["step"] == 1


def test_repeated_first_step_undoes_the_pending_perturbation():
    x, loss = quadratic(torch.tensor([1.0, 3.0, 0.5]))
    x0 = x.detach().clone()
    opt = SAM([x], AdamCM, rho=0.2, lr=0.0)
    loss().backward()
    opt.first_step(zero_grad=True)
    loss().backward()
    with pytest.warns(RuntimeWarning, match="before second_step"):
        opt.first_step(zero_grad=True)
    loss().backward()
    opt.second_step()
    assert torch.equal(x.detach(), x0) and opt.skipped_steps == 1
