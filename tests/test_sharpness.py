"""Sharpness measures against Hessians known in closed form: linear regression
with MSE (H = (2/n)·ZᵀZ) and quadratics 0.5·wᵀAw (H = A)."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

from cl_cm.sharpness import EigenvalueInfo, TraceInfo, hessian_trace, top_hessian_eigenvalue

REL = 0.01  # the project requirement: within 1% of the closed form


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- problems
def orthogonal(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q.to(dtype)


class Quadratic(nn.Module):
    """forward returns 0.5·wᵀAw, whatever the input; its Hessian is A."""

    def __init__(self, a: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=g, dtype=a.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w


def take_output(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


QUAD_DATA = [(torch.zeros(1, 1), torch.zeros(1))]


def quadratic(eigs, rotated: bool = True, dtype=torch.float64):
    lam = torch.tensor(eigs, dtype=dtype)
    q = orthogonal(len(eigs), seed=1, dtype=dtype) if rotated else torch.eye(len(eigs), dtype=dtype)
    return Quadratic(q @ torch.diag(lam) @ q.T)


def designed_regression(eigs, n: int = 64, dtype=torch.float32, diagonal: bool = False):
    """X = U·diag(s)·Vᵀ with (2/n)s² = eigs, so H = (2/n)XᵀX has spectrum eigs
    (and is diagonal when V = I)."""
    d = len(eigs)
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    v = torch.eye(d, dtype=torch.float64) if diagonal else orthogonal(d, seed=4)
    s = torch.sqrt(torch.tensor(eigs, dtype=torch.float64) * n / 2)
    x = u @ torch.diag(s) @ v.T
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(5)
    model = nn.Linear(d, 1, bias=False).to(dtype)
    return model, x.to(dtype), y.to(dtype)


def gaussian_regression(n: int = 512, d: int = 5, bias: bool = False, shift: float = 0.0):
    """A random design: H = (2/n)ZᵀZ, Z = [X, 1] with bias; nearly diagonal for shift = 0."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(8)
    model = nn.Linear(d, 1, bias=bias).double()
    z = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    return model, x, y, 2.0 / n * z.T @ z


MSE = nn.MSELoss()


# ---------------------------------------------------------------- top eigenvalue
def test_top_eigenvalue_of_linear_regression_matches_eigvalsh():
    eigs = [8.0, 4.0, 2.0, 1.0, 0.5]
    model, x, y = designed_regression(eigs)
    h = 2.0 / x.shape[0] * x.double().T @ x.double()
    assert rel_err(torch.linalg.eigvalsh(h)[-1].item(), 8.0) < 1e-5  # the design is right
    info = top_hessian_eigenvalue(model, MSE, [(x, y)], return_info=True)
    assert isinstance(info, EigenvalueInfo) and info.converged
    assert rel_err(info.value, torch.linalg.eigvalsh(h)[-1].item()) < REL
    assert info.iterations == len(info.history) > 1


def test_top_eigenvalue_of_quadratic_with_known_spectrum():
    model = quadratic([10.0, 3.0, 1.0, 0.5])
    value = top_hessian_eigenvalue(model, take_output, QUAD_DATA, tol=1e-10)
    assert isinstance(value, float)
    assert rel_err(value, 10.0) < 1e-6


def test_power_iteration_returns_the_eigenvalue_of_largest_magnitude():
    model = quadratic([-5.0, 2.0, 1.0])
    assert rel_err(top_hessian_eigenvalue(model, take_output, QUAD_DATA), -5.0) < REL


# ---------------------------------------------------------------- trace
def test_trace_is_exact_for_a_diagonal_hessian():
    model = quadratic([10.0, 3.0, 1.0, 0.5], rotated=False)
    info = hessian_trace(model, take_output, QUAD_DATA, samples=20, return_info=True)
    assert isinstance(info, TraceInfo) and info.samples == 20 and info.converged is None
    assert all(rel_err(h, 14.5) < 1e-12 for h in info.history)  # every sample is exact
    assert rel_err(info.value, 14.5) < 1e-12 and info.stderr < 1e-12


def test_trace_of_diagonal_linear_regression():
    eigs = [8.0, 4.0, 2.0, 1.0, 0.5]
    model, x, y = designed_regression(eigs, diagonal=True)
    h = 2.0 / x.shape[0] * x.double().T @ x.double()
    value = hessian_trace(model, MSE, [(x, y)], samples=5)
    assert rel_err(value, torch.trace(h).item()) < 1e-5
    assert rel_err(value, sum(eigs)) < 1e-5


def test_trace_of_random_design_regression_within_one_percent():
    # Off-diagonal entries are O(1/√n), so the estimator's variance is small.
    model, x, y, h = gaussian_regression()
    info = hessian_trace(model, MSE, [(x, y)], samples=400, return_info=True)
    exact = torch.trace(h).item()
    assert rel_err(info.value, exact) < REL
    assert abs(info.value - exact) < 4 * info.stderr


def test_trace_of_rotated_quadratic_is_unbiased_with_the_right_stderr():
    model = quadratic([10.0, 3.0, 1.0, 0.5])
    a = model.a
    off = a - torch.diag(torch.diagonal(a))
    per_sample_sd = math.sqrt(2 * (off ** 2).sum().item())  # Var vᵀAv = 2·Σ_{i≠j} A_ij²
    info = hessian_trace(model, take_output, QUAD_DATA, samples=2000, return_info=True)
    assert abs(info.value - 14.5) < 4 * info.stderr
    assert info.stderr == pytest.approx(per_sample_sd / math.sqrt(2000), rel=0.15)


def test_trace_tolerance_stops_early_or_warns():
    model = quadratic([10.0, 3.0, 1.0, 0.5], rotated=False)
    info = hessian_trace(model, take_output, QUAD_DATA, samples=100, tol=1e-3, return_info=True)
    assert info.converged is True and info.samples == 10  # exact samples: stderr 0
    with pytest.warns(RuntimeWarning, match="standard error"):
        info = hessian_trace(quadratic([10.0, 3.0, 1.0, 0.5]), take_output, QUAD_DATA,
                             samples=5, tol=1e-3, return_info=True)
    assert info.converged is False and info.samples == 5


# ---------------------------------------------------------------- several parameter tensors
def test_weight_and_bias_match_autograd_hessian():
    model, x, y, h = gaussian_regression(n=64, d=3, bias=True, shift=1.0)
    w, b = model.weight.detach(), model.bias.detach()

    def loss_of(theta):
        return MSE(x @ theta[:3].unsqueeze(1) + theta[3], y)

    h_auto = torch.autograd.functional.hessian(loss_of, torch.cat([w.reshape(-1), b]))
    torch.testing.assert_close(h_auto, h)  # closed form and autograd agree
    assert h[:3, 3].abs().min() > 0.5  # the weight-bias blocks matter

    value = top_hessian_eigenvalue(model, MSE, [(x, y)], tol=1e-10)
    assert rel_err(value, torch.linalg.eigvalsh(h)[-1].item()) < 1e-6

    info = hessian_trace(model, MSE, [(x, y)], samples=200, return_info=True)
    exact = {round((torch.tensor(s, dtype=h.dtype) @ h @ torch.tensor(s, dtype=h.dtype)).item(), 8)
             for s in itertools.product([-1.0, 1.0], repeat=4)}
    assert {round(v, 8) for v in info.history} == exact  # each sample is vᵀHv for a ±1 vector
    assert abs(info.value - torch.trace(h).item()) < 4 * info.stderr


# ---------------------------------------------------------------- data handling
def test_several_batches_equal_one_big_batch():
    model, x, y, _ = gaussian_regression(n=64, d=4, shift=0.5)
    one = [(x, y)]
    sizes = [10, 30, 24]  # unequal: averaging batch means would be wrong
    several = list(zip(x.split(sizes), y.split(sizes)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.zeros(64)),
                                         batch_size=16)  # (x, y, task label) batches
    ref = top_hessian_eigenvalue(model, MSE, one, tol=1e-10)
    for data in (several, loader):
        assert top_hessian_eigenvalue(model, MSE, data, tol=1e-10) == pytest.approx(ref, rel=1e-9)
        assert hessian_trace(model, MSE, data, samples=10) == pytest.approx(
            hessian_trace(model, MSE, one, samples=10), rel=1e-9)
    naive = sum(2.0 / len(xb) * xb.T @ xb for xb in x.split(sizes)) / 3
    assert rel_err(torch.linalg.eigvalsh(naive)[-1].item(), ref) > 1e-3


# ---------------------------------------------------------------- determinism
def test_same_seed_same_float_and_other_seeds_agree():
    model, x, y = designed_regression([8.0, 4.0, 2.0, 1.0, 0.5])
    data = [(x, y)]
    assert top_hessian_eigenvalue(model, MSE, data, seed=3) == top_hessian_eigenvalue(model, MSE, data, seed=3)
    assert hessian_trace(model, MSE, data, samples=7, seed=3) == hessian_trace(model, MSE, data, samples=7, seed=3)
    e0, e1 = (top_hessian_eigenvalue(model, MSE, data, seed=s) for s in (0, 1))
    assert e0 != e1 and rel_err(e0, e1) < 1e-3  # another start vector, the same answer
    model, x, y, _ = gaussian_regression()  # a non-diagonal Hessian: samples differ
    t0, t1 = (hessian_trace(model, MSE, [(x, y)], samples=100, seed=s) for s in (0, 1))
    assert t0 != t1 and rel_err(t0, t1) < REL


def test_non_convergence_warns():
    model = quadratic([10.0, 3.0, 1.0, 0.5])
    with pytest.warns(RuntimeWarning, match="did not converge"):
        info = top_hessian_eigenvalue(model, take_output, QUAD_DATA, iters=1, return_info=True)
    assert info.converged is False and info.iterations == 1 and len(info.history) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converging run does not warn
        assert top_hessian_eigenvalue(model, take_output, QUAD_DATA, return_info=True).converged


# ---------------------------------------------------------------- side effects
@pytest.mark.parametrize("train", [True, False])
def test_model_state_is_left_unchanged(train):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    model.train(train)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[3].bias.grad = torch.zeros_like(model[3].bias)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad(), warnings.catch_warnings():  # works under no_grad too
        warnings.simplefilter("ignore", RuntimeWarning)
        e = top_hessian_eigenvalue(model, MSE, [(x, y)], iters=3)
        t = hessian_trace(model, MSE, [(x, y)], samples=3)
    assert math.isfinite(e) and math.isfinite(t) and e != 0.0
    assert model.training is train
    for p, p0, g0 in zip(model.parameters(), params, grads):
        assert torch.equal(p, p0)
        assert (p.grad is None) if g0 is None else torch.equal(p.grad, g0)
    assert model[1].weight.grad is None
    for b, b0 in zip(model.buffers(), buffers):
        assert torch.equal(b, b0)


# ---------------------------------------------------------------- errors
def test_bad_inputs_raise_value_error():
    model = quadratic([2.0, 1.0])
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(model, take_output, QUAD_DATA, iters=0)
    with pytest.raises(ValueError, match="samples"):
        hessian_trace(model, take_output, QUAD_DATA, samples=0)
    for fn in (top_hessian_eigenvalue, hessian_trace):
        with pytest.raises(ValueError, match="empty"):
            fn(model, take_output, [])
        with pytest.raises(ValueError, match="scalar"):
            fn(nn.Linear(2, 1), nn.MSELoss(reduction="none"), [(torch.ones(3, 2), torch.ones(3, 1))])
    model.w.requires_grad_(False)
    for fn in (top_hessian_eigenvalue, hessian_trace):
        with pytest.raises(ValueError, match="require grad"):
            fn(model, take_output, QUAD_DATA)


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    eigs = [10.0, 3.0, 1.0, 0.5]
    cpu = quadratic(eigs)
    gpu = quadratic(eigs).cuda()
    e_cpu = top_hessian_eigenvalue(cpu, take_output, QUAD_DATA, tol=1e-10)
    e_gpu = top_hessian_eigenvalue(gpu, take_output, QUAD_DATA, tol=1e-10)  # CPU batches moved
    assert rel_err(e_gpu, 10.0) < 1e-6 and rel_err(e_gpu, e_cpu) < 1e-9
    t_cpu = hessian_trace(cpu, take_output, QUAD_DATA, samples=20)
    t_gpu = hessian_trace(gpu, take_output, QUAD_DATA, samples=20)
    assert rel_err(t_gpu, t_cpu) < 1e-9  # the same Rademacher vectors on both devices
    model, x, y = designed_regression([8.0, 4.0, 2.0, 1.0, 0.5])
    assert rel_err(top_hessian_eigenvalue(model.cuda(), MSE, [(x, y)]), 8.0) < REL
