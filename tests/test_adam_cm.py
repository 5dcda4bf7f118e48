"""Adam+CM and Adam+CG against the algorithm as written, against torch's
AdamW, and against the authors' recorded trajectory; the buffer controls and
statistics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_cm import AdamCG, AdamCM

IMPLS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
DATA = Path(__file__).parent / "data"


# ---------------------------------------------------------------- a problem
def problem(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    return model


def batch(t, dtype=torch.float64):
    g = torch.Generator().manual_seed(500 + t)
    scale = 0.2 + 2.0 * torch.rand((), generator=g)  # varying gradient norms
    return (scale * torch.randn(8, 4, generator=g)).to(dtype), torch.randn(8, 2, generator=g).to(dtype)


def loss_fn(model, t):
    x, y = batch(t, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x), y)


def run(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------ the oracle: Alg. 1
def oracle(model, steps, *, lr, betas, eps, wd, capacity, decay, kappa, second_moment="aggregated",
           stores="momentum"):
    """Algorithm 1 of Malviya et al. (2024) on the flattened parameter vector,
    written as plainly as possible (Adam+CG when stores == "gradient")."""
    shapes = [p.shape for p in model.parameters()]
    theta = flat(model).clone()
    b1, b2 = betas
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    buffer: list[tuple[float, torch.Tensor]] = []
    trajectory = []
    for t in range(1, steps + 1):
        th = theta.clone().requires_grad_(True)
        with torch.no_grad():
            offset = 0
            for p, s in zip(model.parameters(), shapes):
                p.copy_(th[offset:offset + s.numel()].view(s))
                offset += s.numel()
        model.zero_grad()
        loss_fn(model, t - 1).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        mean_b = sum(e for _, e in buffer) / len(buffer) if buffer else torch.zeros_like(g)
        if stores == "momentum":
            m = b1 * m + (1 - b1) * g
            d = m + kappa * mean_b
            v = b2 * v + (1 - b2) * (d * d if second_moment == "aggregated" else g * g)
            entry = m.clone()
        else:
            gh = g + kappa * mean_b
            m = b1 * m + (1 - b1) * gh
            v = b2 * v + (1 - b2) * gh * gh
            d = m
            entry = g.clone()
        theta = theta * (1 - lr * wd)
        theta = theta - lr / (1 - b1**t) * d / ((v / (1 - b2**t)).sqrt() + eps)
        priority = float(g.norm())
        if len(buffer) < capacity:
            buffer.append((priority, entry))
        elif capacity:
            low = min(range(len(buffer)), key=lambda i: buffer[i][0])
            if priority > buffer[low][0]:
                buffer[low] = (priority, entry)
        buffer = [(q * decay, e) for q, e in buffer]
        trajectory.append(theta.clone())
    return trajectory, buffer


SETTINGS = [
    dict(capacity=3, decay=0.7, kappa=1.0),
    dict(capacity=4, decay=0.97, kappa=0.5),   # slow decay: many new entries are dropped
    dict(capacity=1, decay=0.0, kappa=2.0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("setting", SETTINGS, ids=["C3", "C4-slow-decay", "C1"])
@pytest.mark.parametrize("variant", ["aggregated", "gradient", "adam_cg"])
def test_matches_algorithm_1(variant, setting, impl):
    hp = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-8, wd=0.05)
    expected, exp_buffer = oracle(problem(), 40, **hp, **setting,
                                  second_moment="gradient" if variant == "gradient" else "aggregated",
                                  stores="gradient" if variant == "adam_cg" else "momentum")
    model = problem()
    kw = dict(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["wd"],
              buffer_size=setting["capacity"], decay=setting["decay"], kappa=setting["kappa"], **IMPLS[impl])
    opt = (AdamCG(model.parameters(), **kw) if variant == "adam_cg"
           else AdamCM(model.parameters(), second_moment=variant, **kw))
    replaced = dropped = 0
    for t in range(40):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()
        torch.testing.assert_close(flat(model), expected[t], rtol=1e-9, atol=1e-12)
        stats = opt.buffer_stats()
        if stats["replacement_rate"] == 1.0:
            replaced += 1
        elif stats["replacement_rate"] == 0.0:
            dropped += 1
    assert replaced > 0, "the test must exercise replacement"
    if setting["decay"] > 0.9:
        assert dropped > 0, "the test must exercise dropped entries"
    st = opt.state[model[0].weight]
    assert st["priority"] == pytest.approx([q for q, _ in exp_buffer], rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs", [dict(kappa=0.0), dict(buffer_size=0)], ids=["kappa0", "C0"])
def test_gradient_second_moment_without_buffer_term_is_adamw(kwargs, impl):
    torch.manual_seed(0)
    a, b = problem(torch.float32), problem(torch.float32)
    groups = lambda m: [dict(params=m[0].parameters(), lr=1e-2, weight_decay=0.1),
                        dict(params=m[2].parameters(), lr=3e-3, weight_decay=0.0)]
    ours = AdamCM(groups(a), second_moment="gradient", **kwargs, **IMPLS[impl])
    ref = torch.optim.AdamW(groups(b), **IMPLS[impl])
    for t in range(30):
        run(a, ours, 1, start=t)
        run(b, ref, 1, start=t)
        assert torch.equal(flat(a), flat(b)), f"differs from AdamW at step {t + 1}"
    assert torch.equal(ours.state[a[0].weight]["exp_avg_sq"], ref.state[b[0].weight]["exp_avg_sq"])


def test_aggregated_second_moment_is_not_adamw():
    """The paper's default feeds v with d_t², so even an empty buffer differs
    from AdamW: v tracks m_t², not g_t²."""
    a, b = problem(torch.float32), problem(torch.float32)
    ours = AdamCM(a.parameters(), buffer_size=0, lr=1e-2)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    run(a, ours, 5)
    run(b, ref, 5)
    assert not torch.allclose(flat(a), flat(b), atol=1e-6)


def test_implementations_agree_in_float32():
    results = []
    for impl in IMPLS.values():
        model = problem(torch.float32)
        run(model, AdamCM(model.parameters(), lr=1e-2, weight_decay=0.01, **impl), 50)
        results.append(flat(model))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------ the authors' implementation
def _replay_reference(reference_compat: bool, impl: dict):
    d = json.loads((DATA / "reference_trajectory.json").read_text())
    f64 = dict(dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, values, shape in zip(model.parameters(), d["init"], d["shapes"]):
            p.copy_(torch.tensor(values, **f64).view(shape))
    groups = [dict(params=list(model[g["layer"]].parameters()), lr=g["lr"], weight_decay=g["weight_decay"],
                   buffer_size=g["buffer_size"], decay=g["decay"]) for g in d["groups"]]
    opt = AdamCM(groups, betas=(0.9, 0.999), eps=1e-8, kappa=1.0, reference_compat=reference_compat, **impl)
    xs, ys = torch.tensor(d["inputs"], **f64), torch.tensor(d["targets"], **f64)
    errors = []
    for t in range(len(xs)):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs[t]), ys[t]).backward()
        opt.step()
        errors.append(float((flat(model) - torch.tensor(d["trajectory"][t], **f64)).abs().max()))
    return errors


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_compat_follows_the_authors_trajectory(impl):
    errors = _replay_reference(True, IMPLS[impl])
    assert len(errors) >= 50
    assert max(errors) < 1e-12, f"largest deviation {max(errors):.3g}"


def test_without_reference_compat_the_trajectory_differs():
    errors = _replay_reference(False, {})
    assert errors[0] > 1e-4, "our first step moves the parameters; theirs does not"
    assert max(errors) > 1e-3


def test_documented_differences_from_the_authors():
    """First step and priority: ours stores m_1 with the global norm and
    moves; reference_compat stores g_1 with the sum of norms and only decays."""
    for compat in (False, True):
        model = problem(torch.float32)
        before = flat(model).clone()
        opt = AdamCM(model.parameters(), lr=1e-2, weight_decay=0.0, decay=0.5, reference_compat=compat)
        opt.zero_grad()
        loss_fn(model, 0).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        st = opt.state[model[0].weight]
        if compat:
            expected_priority = sum(float(g.norm()) for g in grads)
            assert torch.equal(flat(model), before)
            assert torch.equal(st["buffer"][0], grads[0])
        else:
            expected_priority = float(torch.cat([g.flatten() for g in grads]).norm())
            assert not torch.equal(flat(model), before)
            torch.testing.assert_close(st["buffer"][0], 0.1 * grads[0])
        assert st["priority"] == pytest.approx([0.5 * expected_priority], rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(kappa=0.0), dict(buffer_size=0), dict(buffer_size=0, kappa=0.0)])
def test_kappa_zero_and_no_buffer_are_valid(kwargs):
    model = problem(torch.float32)
    opt = AdamCM(model.parameters(), lr=1e-2, **kwargs)
    run(model, opt, 10)
    assert torch.isfinite(flat(model)).all()
    stats = opt.buffer_stats()
    if kwargs.get("buffer_size") == 0:
        assert "buffer" not in opt.state[model[0].weight]
        assert stats["size"] == 0 and stats["capacity"] == 0
    else:
        assert stats["size"] == 5


# ---------------------------------------------------------- buffer controls
def trained(cls=AdamCM, steps=12, **kw):
    model = problem(torch.float32)
    opt = cls(model.parameters(), lr=1e-2, decay=0.9, **kw)
    run(model, opt, steps)
    return model, opt


def test_reset_buffer_empties_and_the_next_step_uses_no_buffer_term():
    model, opt = trained()
    opt.reset_buffer()
    assert opt.buffer_stats()["size"] == 0
    assert opt.state[model[0].weight]["buffer_sum"].abs().sum() == 0
    twin_model, twin = trained(buffer_size=0)
    # same moments: copy them from the reset optimizer, then step both once
    for p, q in zip(model.parameters(), twin_model.parameters()):
        with torch.no_grad():
            q.copy_(p)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            twin.state[q][k] = opt.state[p][k].clone()
    run(model, opt, 1, start=50)
    run(twin_model, twin, 1, start=50)
    assert torch.equal(flat(model), flat(twin_model))
    assert opt.buffer_stats()["size"] == 1


def test_decay_buffer_scales_entries_and_priorities():
    model, opt = trained()
    st = opt.state[model[0].weight]
    rows, priority = st["buffer"].clone(), list(st["priority"])
    opt.decay_buffer(0.25)
    torch.testing.assert_close(st["buffer"], rows * 0.25)
    torch.testing.assert_close(st["buffer_sum"], (rows * 0.25).sum(0))
    assert st["priority"] == pytest.approx([q * 0.25 for q in priority])
    with pytest.raises(ValueError, match="factor"):
        opt.decay_buffer(1.5)


def test_resize_buffer_keeps_the_highest_priorities_and_frees_memory():
    model, opt = trained()
    st = opt.state[model[0].weight]
    rows, priority = st["buffer"].clone(), list(st["priority"])
    top = sorted(sorted(range(5), key=lambda i: -priority[i])[:2])
    opt.resize_buffer(2)
    st = opt.state[model[0].weight]
    assert st["buffer"].shape[0] == 2 and opt.param_groups[0]["buffer_size"] == 2
    assert st["priority"] == [priority[i] for i in top]
    assert torch.equal(st["buffer"], rows[top])
    torch.testing.assert_close(st["buffer_sum"], rows[top].sum(0))
    stats = opt.buffer_stats()
    assert (stats["size"], stats["capacity"]) == (2, 2)
    opt.resize_buffer(0)
    assert "buffer" not in opt.state[model[0].weight] and opt.buffer_nbytes() == 0
    run(model, opt, 2, start=20)
    assert opt.buffer_stats()["size"] == 0
    opt.resize_buffer(3)  # growing again allocates empty slots
    run(model, opt, 2, start=22)
    assert opt.buffer_stats()["size"] == 2 and opt.state[model[0].weight]["buffer"].shape[0] == 3
    with pytest.raises(ValueError, match="buffer_size"):
        opt.resize_buffer(-1)


def test_changing_buffer_size_in_the_group_resizes_at_the_next_step():
    model, opt = trained()
    opt.param_groups[0]["buffer_size"] = 3
    run(model, opt, 1, start=40)
    assert opt.state[model[0].weight]["buffer"].shape[0] == 3
    assert opt.buffer_stats()["size"] == 3


def _scalar_run(norms, decay=0.9, capacity=2):
    x = nn.Parameter(torch.zeros(1))
    opt = AdamCM([x], buffer_size=capacity, decay=decay)
    for n in norms:
        x.grad = torch.tensor([n])
        opt.step()
    return opt


def test_replacement_rate_counts_replacements_among_full_steps():
    rising = _scalar_run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # each new norm beats the smallest
    assert rising.buffer_stats()["replacement_rate"] == 1.0
    falling = _scalar_run([100.0, 90.0, 1.0, 1.0, 1.0, 1.0])  # small norms are dropped
    assert falling.buffer_stats()["replacement_rate"] == 0.0
    mixed = _scalar_run([10.0, 10.0, 1.0, 50.0, 1.0, 100.0], decay=1.0)
    stats = mixed.buffer_stats()
    assert stats["replacement_rate"] == 0.5
    assert math.isnan(mixed.buffer_stats()["replacement_rate"]), "counts restart after each call"


def test_exploration_and_cosine_similarity_from_the_state():
    model, opt = trained(steps=15)
    states = [opt.state[p] for p in model.parameters()]
    n = len(states[0]["priority"])
    mean_b = torch.cat([st["buffer"][:n].mean(0).flatten() for st in states])
    m = torch.cat([st["exp_avg"].flatten() for st in states])
    rows = torch.cat([st["buffer"][:n].reshape(n, -1) for st in states], dim=1).double()
    cos = nn.functional.cosine_similarity(rows[:, None], rows[None, :], dim=-1)
    expected_cos = cos[torch.triu_indices(n, n, 1).unbind()].mean()
    stats = opt.buffer_stats()
    assert stats["exploration"] == pytest.approx(float(mean_b.norm() / m.norm()), rel=1e-5)
    assert stats["cosine_similarity"] == pytest.approx(float(expected_cos), rel=1e-6)
    assert stats["mean_priority"] == pytest.approx(sum(states[0]["priority"]) / n)


def test_critical_momenta_agree_while_critical_gradients_cancel():
    """The paper's Fig. 3 diagnostic on a noisy problem: stored momenta point
    the same way, stored gradients much less so."""
    results = {}
    for cls in (AdamCM, AdamCG):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(50))
        target = torch.randn(50)
        opt = cls([w], lr=1e-3, buffer_size=5, decay=0.7)
        sims = []
        for t in range(200):
            noise = torch.randn(50) * 3.0
            w.grad = (w.detach() - target) + noise
            opt.step()
            if t > 20:
                sims.append(opt.buffer_stats()["cosine_similarity"])
        results[cls.__name__] = sum(sims) / len(sims)
    assert results["AdamCM"] > 0.5
    assert results["AdamCG"] < 0.2
    assert results["AdamCM"] > results["AdamCG"] + 0.4


def test_bfloat16_buffer_halves_memory_and_survives_checkpoints(tmp_path):
    _, full = trained()
    model, half = trained(buffer_dtype=torch.bfloat16)
    assert half.buffer_nbytes() * 2 == full.buffer_nbytes()
    torch.save(half.state_dict(), tmp_path / "s.pt")
    model2 = problem(torch.float32)
    opt2 = AdamCM(model2.parameters(), lr=1e-2, decay=0.9, buffer_dtype=torch.bfloat16)
    opt2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    st, st2 = half.state[model[0].weight], opt2.state[model2[0].weight]
    assert st2["buffer"].dtype == torch.bfloat16 and torch.equal(st["buffer"], st2["buffer"])
    assert st2["step"].device.type == "cpu"


def test_buffer_sum_stays_exact_over_many_replacements():
    model, opt = trained(steps=300)
    for p in model.parameters():
        st = opt.state[p]
        torch.testing.assert_close(st["buffer_sum"], st["buffer"].sum(0), rtol=1e-5, atol=1e-6)


def test_resize_buffer_per_group_and_reset_moments():
    model = problem(torch.float32)
    opt = AdamCM([dict(params=model[0].parameters()), dict(params=model[2].parameters(), buffer_size=3)],
                 lr=1e-2)
    run(model, opt, 6)
    opt.resize_buffer([2, 1])
    assert [g["buffer_size"] for g in opt.param_groups] == [2, 1]
    assert opt.state[model[0].weight]["buffer"].shape[0] == 2
    assert opt.state[model[2].weight]["buffer"].shape[0] == 1
    with pytest.raises(ValueError, match="one per parameter group"):
        opt.resize_buffer([1, 2, 3])
    rows = opt.state[model[0].weight]["buffer"].clone()
    opt.reset_moments()
    st = opt.state[model[0].weight]
    assert st["exp_avg"].abs().sum() == 0 and st["exp_avg_sq"].abs().sum() == 0 and st["step"] == 0
    assert torch.equal(st["buffer"], rows), "reset_moments keeps the buffer"


@pytest.mark.parametrize("cls", [AdamCM, AdamCG], ids=["AdamCM", "AdamCG"])
def test_bfloat16_parameters_and_autocast_train(cls):
    """bf16 parameters (fused kernel on the CPU) and float32 parameters under
    bf16 autocast both train."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 2)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        model = problem(dtype)
        opt = cls(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        assert opt.state[model[0].weight]["exp_avg"].dtype == dtype
        assert losses[-1] < 0.5 * losses[0] and all(math.isfinite(v) for v in losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_at_most_one_host_sync_per_step_on_cuda(impl):
    import warnings

    model = problem(torch.float32).cuda()
    opt = AdamCM(model.parameters(), lr=1e-2, buffer_size=3, **IMPLS[impl])
    x, y = torch.randn(8, 4, device="cuda"), torch.randn(8, 2, device="cuda")
    for _ in range(6):  # fill the buffer first: the steady state replaces entries
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


# ------------------------------------------------------------ the 8-bit buffer
def wide(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(dtype)


def train_wide(buffer_dtype, steps=40, decay=0.9):
    model = wide()
    opt = AdamCM(model.parameters(), lr=1e-2, decay=decay, buffer_dtype=buffer_dtype)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g) * (0.2 + 3 * torch.rand((), generator=g))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_8bit_buffer_takes_about_a_quarter_of_float32s_memory():
    """int8 codes plus one float32 scale per 256 elements: 1 + 4/256 bytes per
    element against 4, i.e. 25.4% for tensors of whole blocks."""
    _, full = train_wide(None, steps=6)
    _, small = train_wide("int8", steps=6)
    ratio = small.buffer_nbytes() / full.buffer_nbytes()
    st = small.state[small.param_groups[0]["params"][0]]
    assert st["buffer"].dtype == torch.int8 and st["buffer_scale"].dtype == torch.float32
    assert st["buffer_scale"].shape == (5, 64 * 64 // 256)
    assert ratio < 0.2545, ratio  # 4096 weights: exactly (4096 + 64) / 16384; the biases round up to a block


def test_8bit_buffer_sum_matches_the_stored_rows_after_many_replacements():
    from cl_cm import buffer as B

    model, opt = train_wide("int8", steps=300, decay=0.7)
    assert opt.buffer_stats()["replacement_rate"] > 0.5
    for p in model.parameters():
        st = opt.state[p]
        rows = B.rows(st, len(st["priority"]), torch.float64)
        torch.testing.assert_close(st["buffer_sum"].double(), rows.sum(0), rtol=1e-5, atol=1e-7)


def test_8bit_rows_are_within_half_a_step_of_the_stored_momentum():
    from cl_cm import buffer as B

    m = torch.randn(1000) * torch.logspace(-6, 2, 1000)  # blocks of very different magnitudes
    row, scale = torch.empty(1000, dtype=torch.int8), torch.empty(4)
    B.write_row_(torch.zeros(1000), row, m, False, scale)
    stored = B.stored(row, scale, torch.float32)
    blocks = torch.nn.functional.pad(m, (0, 24)).view(4, 256).abs().amax(1)
    bound = (blocks / 127 / 2).repeat_interleave(256)[:1000] * (1 + 1e-5)
    assert ((stored - m).abs() <= bound).all()
    assert torch.equal(B.stored(row, scale, torch.float32)[m.abs() == m.abs().max()].abs(), m.abs().max().view(1))


def test_8bit_buffer_checkpoint_decay_and_resize(tmp_path):
    model, opt = train_wide("int8", steps=12)
    torch.save(opt.state_dict(), tmp_path / "s.pt")
    model2 = wide()
    opt2 = AdamCM(model2.parameters(), lr=1e-2, decay=0.9, buffer_dtype="int8")
    opt2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for p, q in zip(model.parameters(), model2.parameters()):
        for k in ("buffer", "buffer_scale", "buffer_sum"):
            assert opt2.state[q][k].dtype == opt.state[p][k].dtype and torch.equal(opt2.state[q][k], opt.state[p][k])
    st = opt.state[model[0].weight]
    codes, scales = st["buffer"].clone(), st["buffer_scale"].clone()
    opt.decay_buffer(0.5)  # exact: the scales halve, the codes stay
    assert torch.equal(st["buffer"], codes) and torch.equal(st["buffer_scale"], scales * 0.5)
    from cl_cm import buffer as B
    torch.testing.assert_close(st["buffer_sum"], B.rows(st, 5, torch.float32).sum(0))
    priority = list(st["priority"])
    top = sorted(sorted(range(5), key=lambda i: -priority[i])[:2])
    opt.resize_buffer(2)
    st = opt.state[model[0].weight]
    assert torch.equal(st["buffer"], codes[top]) and torch.equal(st["buffer_scale"], scales[top] * 0.5)
