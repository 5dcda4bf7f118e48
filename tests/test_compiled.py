"""AdamCM(compiled=True): steps 1–4 through torch.compile give the eager
optimizer's trajectory (the CPU needs a C++ compiler for inductor's kernels)."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from cl_cm import AdamCM

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="torch.compile on the CPU needs a C++ compiler")


def trajectory(compiled: bool, dtype=torch.float64, steps: int = 36, buffer_dtype=None):
    """Two groups (one with weight decay and its own lr), a buffer of 3 that
    fills and replaces entries (written by the compiled kernel itself), a
    parameter that joins at step 12 (its own step count, hence its own bias
    corrections) and then lacks a gradient every third step (its entry is
    written outside the kernel), and an lr changed at step 24."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    late = nn.Parameter(torch.randn(3, dtype=dtype))
    opt = AdamCM([{"params": net[0].parameters()},
                  {"params": net[2].parameters(), "lr": 3e-3, "weight_decay": 0.1}],
                 lr=1e-2, buffer_size=3, decay=0.9, compiled=compiled, buffer_dtype=buffer_dtype)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t == 12:
            opt.add_param_group({"params": [late], "lr": 5e-3})
        if t == 24:
            opt.param_groups[0]["lr"] = 2e-3
        x = torch.randn(32, 6, generator=g, dtype=dtype) * (0.2 + 3 * torch.rand((), generator=g).item())
        y = torch.randn(32, 3, generator=g, dtype=dtype)
        opt.zero_grad()
        out = net(x) + (late if t >= 12 and t % 3 else 0)  # every third step `late` has no gradient
        nn.functional.mse_loss(out, y).backward()
        opt.step()
    return [p.detach().clone() for p in [*net.parameters(), late]], opt


@pytest.fixture(scope="module")
def runs():
    return {compiled: trajectory(compiled) for compiled in (True, False)}


def test_compiled_update_follows_the_eager_trajectory(runs):
    check_same(runs[True], runs[False])


def test_compiled_update_with_a_bfloat16_buffer_follows_the_eager_trajectory():
    """The stored rows are rounded to bfloat16 and ΣB sums the rounded rows,
    as in the eager insertion (float64 parameters, so that only the logic
    could differ)."""
    check_same(trajectory(True, buffer_dtype=torch.bfloat16), trajectory(False, buffer_dtype=torch.bfloat16))


def check_same(fast_run, eager_run):
    (fast, opt_fast), (eager, opt_eager) = fast_run, eager_run
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert opt_fast.buffer_stats()["replacement_rate"] > 0  # entries were replaced, not just stored
    for p_fast, p_eager in zip(opt_fast.state.values(), opt_eager.state.values()):
        assert p_fast["priority"] == pytest.approx(p_eager["priority"], rel=1e-12)
        torch.testing.assert_close(p_fast["buffer_sum"], p_eager["buffer_sum"], rtol=1e-12, atol=1e-12)
        assert float(p_fast["step"]) == float(p_eager["step"])


def test_compiled_state_dict_continues_in_an_eager_optimizer(runs):
    """The compiled path keeps the same plain-tensor state: a checkpoint of
    it resumes in an eager AdamCM (and the flag travels with the groups)."""
    _, opt = runs[True]
    state = opt.state_dict()
    assert state["param_groups"][0]["compiled"] is True
    params = [torch.zeros_like(p) for group in opt.param_groups for p in group["params"]]
    sizes = [len(group["params"]) for group in opt.param_groups]
    groups, start = [], 0
    for n in sizes:
        groups.append({"params": params[start:start + n]})
        start += n
    fresh = AdamCM(groups)
    fresh.load_state_dict(state)
    for group in fresh.param_groups:
        group["compiled"] = False
    for p in params:
        p.grad = torch.ones_like(p)
    fresh.step()  # runs eagerly on the loaded state
    assert all(float(st["step"]) > 1 for st in fresh.state.values())


def test_compiled_refuses_the_gradient_second_moment():
    with pytest.raises(ValueError, match="compiled=True"):
        AdamCM([nn.Parameter(torch.zeros(2))], compiled=True, second_moment="gradient")


def test_compiled_update_trains_bfloat16_parameters():
    """bf16 parameters, moments and buffer: the compiled pass computes in
    float32 like torch's kernels and stays within bf16 rounding of eager."""
    def train(compiled):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.bfloat16)
        opt = AdamCM(net.parameters(), lr=1e-2, buffer_size=3, compiled=compiled)
        g = torch.Generator().manual_seed(1)
        for _ in range(20):
            x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(net(x.to(torch.bfloat16)).float(), y).backward()
            opt.step()
        return torch.cat([p.detach().float().flatten() for p in net.parameters()]), opt

    (fast, opt), (eager, _) = train(True), train(False)
    assert all(p.dtype == torch.bfloat16 for p in opt.param_groups[0]["params"])
    assert torch.isfinite(fast).all()
    assert (fast - eager).abs().max() < 0.05  # a few bf16 ulps of values of order 1
    assert opt.buffer_stats()["size"] == 3


def grown_trajectory(compiled: bool, steps: int = 24):
    """Nine parameter groups of nine different shapes (one more than dynamo's
    default of 8 graphs per function), a group that gets a parameter
    appended at step 8 (a model that grows, as Avalanche grows a head) and a
    new group at step 16; lr changes, and a parameter without gradient on
    every fourth step."""
    torch.manual_seed(0)
    dtype = torch.float64
    shapes = [(3,), (2, 5), (7,), (4, 4), (3, 2, 2), (9,), (6, 2), (11,), (5, 3)]
    params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    extra, late = nn.Parameter(torch.randn(4, dtype=dtype)), nn.Parameter(torch.randn(2, 3, dtype=dtype))
    opt = AdamCM([{"params": [p], "lr": 1e-2 * (1 + i % 3)} for i, p in enumerate(params)],
                 buffer_size=3, decay=0.9, compiled=compiled)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t == 8:
            opt.param_groups[0]["params"].append(extra)
        if t == 16:
            opt.add_param_group({"params": [late]})
        if t == 12:
            opt.param_groups[3]["lr"] = 3e-3
        live = params + ([extra] if t >= 8 else []) + ([late] if t >= 16 else [])
        scale = 0.2 + 3 * torch.rand((), generator=g, dtype=dtype)
        for i, p in enumerate(live):
            p.grad = None if (t % 4 == 3 and i == 1) else scale * torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return [p.detach().clone() for p in params + [extra, late]], opt


def test_compiled_stays_compiled_for_many_groups_and_a_growing_model():
    """Every step of every group runs through the compiled graph: there is
    no graph break, one graph per group shape (more than dynamo's default
    limit of 8, which would otherwise send the rest to eager silently), new
    graphs only when the model grows, and no recompilation for new numbers
    (lr, bias corrections, κ/|B|), slots or missing gradients. The result is
    the eager optimizer's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # count from an empty cache
    counters.clear()
    fast, opt_fast = grown_trajectory(True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 11, graphs  # 9 group shapes, group 0 grown once, one new group
    # the same shapes again, with other numbers, slots and missing gradients: nothing compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        again, _ = grown_trajectory(True)
    assert counters["stats"]["unique_graphs"] == graphs
    eager, opt_eager = grown_trajectory(False)
    for a, b, c in zip(fast, eager, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12)
    for st_fast, st_eager in zip(opt_fast.state.values(), opt_eager.state.values()):
        assert st_fast["priority"] == pytest.approx(st_eager["priority"], rel=1e-12)
        torch.testing.assert_close(st_fast["buffer_sum"], st_eager["buffer_sum"], rtol=1e-12, atol=1e-12)


def test_compiled_with_the_8bit_buffer_follows_the_eager_trajectory():
    """The 8-bit buffer's rows are written after the compiled pass, by the
    same function as in the eager paths."""
    check_same(trajectory(True, buffer_dtype=torch.int8), trajectory(False, buffer_dtype=torch.int8))
