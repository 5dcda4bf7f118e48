"""One conformance suite over every optimizer, in the manner of torch's own
optimizer tests (test/optim/test_optim.py with its OptimizerInfo): each test
runs for each entry of OPTIMIZERS, and each entry declares what it supports,
so that buffer-, SAM- or dtype-specific checks run where they apply."""
from __future__ import annotations

import math
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from cl_cm import SAM, AdamCG, AdamCM, buffered
from cl_cm import buffer as B

HAS_COMPILER = bool(shutil.which("g++") or shutil.which("c++"))


@dataclass(frozen=True)
class Variant:
    """One optimizer variant and what it supports."""

    make: Callable[..., torch.optim.Optimizer]
    #: what a buffer entry is ("momentum": Adam+CM, "gradient": Adam+CG), None without a buffer
    stores: str | None = None
    #: two forward/backward passes per step (SAM)
    sam: bool = False
    #: the implementation it runs: "fused", "foreach", "forloop" or "compiled" (needs a C++ compiler on the CPU)
    impl: str = "fused"
    #: parameter dtypes it trains
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

    @property
    def buffer(self) -> bool:
        return self.stores is not None

    def __call__(self, params, **kwargs):
        return self.make(params, **kwargs)


ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
OPTIMIZERS = {
    "adam_cm": Variant(lambda ps, **kw: AdamCM(ps, **kw), "momentum", dtypes=ALL_DTYPES),
    "adam_cm_foreach": Variant(lambda ps, **kw: AdamCM(ps, foreach=True, **kw), "momentum", impl="foreach",
                               dtypes=ALL_DTYPES),
    "adam_cm_forloop": Variant(lambda ps, **kw: AdamCM(ps, foreach=False, **kw), "momentum", impl="forloop",
                               dtypes=ALL_DTYPES),
    "adam_cm_compiled": Variant(lambda ps, **kw: AdamCM(ps, compiled=True, **kw), "momentum", impl="compiled"),
    "adam_cm_gradient": Variant(lambda ps, **kw: AdamCM(ps, second_moment="gradient", **kw), "momentum"),
    "adam_cm_bf16_buffer": Variant(lambda ps, **kw: AdamCM(ps, buffer_dtype=torch.bfloat16, **kw), "momentum"),
    "adam_cm_int8_buffer": Variant(lambda ps, **kw: AdamCM(ps, buffer_dtype="int8", **kw), "momentum"),
    "adam_cm_reference": Variant(lambda ps, **kw: AdamCM(ps, reference_compat=True, **kw), "momentum"),
    "adam_cg": Variant(lambda ps, **kw: AdamCG(ps, **kw), "gradient", dtypes=ALL_DTYPES),
    "adam_cg_forloop": Variant(lambda ps, **kw: AdamCG(ps, foreach=False, **kw), "gradient", impl="forloop"),
    "sam_adam_cm": Variant(lambda ps, **kw: SAM(ps, AdamCM, rho=0.05, **kw), "momentum", sam=True),
    "asam_adam_cm": Variant(lambda ps, **kw: SAM(ps, AdamCM, rho=0.5, adaptive=True, **kw), "momentum", sam=True),
    "sam_adam": Variant(lambda ps, **kw: SAM(ps, torch.optim.Adam, rho=0.05, **kw), sam=True),
    "sam_adam_cg": Variant(lambda ps, **kw: SAM(ps, AdamCG, rho=0.05, **kw), "gradient", sam=True),
}
NAMES = sorted(OPTIMIZERS)


def stored_rows(st: dict) -> torch.Tensor:
    """The stored entries of a state, as float32 values (dequantised for the 8-bit buffer)."""
    return B.rows(st, len(st["priority"]), torch.float32)


def holds(st: dict, value: torch.Tensor) -> bool:
    """Whether some row of the buffer stores ``value``, exactly as the buffer stores it."""
    row = torch.empty_like(st["buffer"][0])
    scale = st["buffer_scale"][0].clone() if "buffer_scale" in st else None
    B.write_row_(torch.zeros_like(st["buffer_sum"]), row, value, False, scale)
    scales = st["buffer_scale"] if scale is not None else [None] * len(st["buffer"])
    return any(torch.equal(r, row) and (s is None or torch.equal(s, scale)) for r, s in zip(st["buffer"], scales))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def closure_for(model, opt, t: int):
    x, y = batch(t)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def train(model, opt, steps: int, start: int = 0):
    losses = []
    for t in range(start, start + steps):
        losses.append(float(opt.step(closure_for(model, opt, t)).detach()))
    return losses


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(params=NAMES)
def name(request):
    if OPTIMIZERS[request.param].impl == "compiled" and not HAS_COMPILER:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    return request.param


def test_multiple_param_groups_use_their_own_hyperparameters(name):
    model = make_model()
    frozen_before = [p.detach().clone() for p in model[2].parameters()]
    groups = [dict(params=model[0].parameters(), lr=1e-2),
              dict(params=model[2].parameters(), lr=0.0)]
    if OPTIMIZERS[name].buffer:
        groups[0].update(buffer_size=3, decay=0.5)
        groups[1].update(buffer_size=2, decay=0.9)
    opt = OPTIMIZERS[name](groups)
    first_before = flat(model)[: 6 * 10 + 10].clone()
    train(model, opt, 8)
    # lr = 0 in group 1: it does not move; group 0 does.
    for p, before in zip(model[2].parameters(), frozen_before):
        assert torch.equal(p.detach(), before)
    assert not torch.equal(flat(model)[: 6 * 10 + 10], first_before)
    buf = buffered(opt)
    if buf is not None:
        for group, capacity in zip(buf.param_groups, (3, 2)):
            for p in group["params"]:
                assert buf.state[p]["buffer"].shape[0] == capacity
                assert len(buf.state[p]["priority"]) == capacity


def test_parameters_without_grad_are_skipped_and_buffers_stay_aligned(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 3)
    last = list(model[2].parameters())
    for t in range(3, 9):
        x, y = batch(t)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            for p in last:  # the last layer gets no gradient on these steps
                p.grad = None
            return loss

        before = [p.detach().clone() for p in last]
        opt.step(closure)
        for p, b in zip(last, before):
            assert torch.equal(p.detach(), b), "a parameter without grad moved"
    buf = buffered(opt)
    if buf is None:
        return
    states = [buf.state[p] for p in model.parameters()]
    assert all(st["priority"] == states[0]["priority"] for st in states)
    assert len({st["buffer"].shape[0] for st in states}) == 1
    for p in last:
        st = buf.state[p]
        n = len(st["priority"])
        assert torch.allclose(stored_rows(st).sum(0), st["buffer_sum"].float(), atol=1e-5)
    # rows written while the last layer was skipped hold what it had then:
    st = buf.state[last[0]]
    if OPTIMIZERS[name].stores == "gradient":
        # the 6 skipped steps stored zero gradients for the last layer
        assert any((row == 0).all() for row in stored_rows(st))
    else:
        assert holds(st, st["exp_avg"])


def test_sparse_gradients_give_a_clear_error(name):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = OPTIMIZERS[name](emb.parameters())

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2, 3])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="(?i)sparse"):
        opt.step(closure)


INVALID = [
    ("lr", dict(lr=-1e-3)),
    ("betas", dict(betas=(1.0, 0.999))),
    ("betas", dict(betas=(0.9, -0.1))),
    ("eps", dict(eps=-1.0)),
    ("weight_decay", dict(weight_decay=-0.1)),
    ("decay", dict(decay=1.5)),
    ("decay", dict(decay=-0.1)),
    ("buffer_size", dict(buffer_size=-1)),
    ("buffer_size", dict(buffer_size=2.5)),
    ("kappa", dict(kappa=-1.0)),
    ("buffer_dtype", dict(buffer_dtype=torch.int32)),
]


@pytest.mark.parametrize("cls", [AdamCM, AdamCG], ids=["AdamCM", "AdamCG"])
@pytest.mark.parametrize("param,kwargs", INVALID, ids=[f"{p}-{i}" for i, (p, _) in enumerate(INVALID)])
def test_invalid_hyperparameters_raise_value_error_naming_them(cls, param, kwargs):
    with pytest.raises(ValueError, match=param):
        cls(make_model().parameters(), **kwargs)
    # the same check applies to a group's own settings
    model = make_model()
    with pytest.raises(ValueError, match=param):
        cls([dict(params=model[0].parameters()), dict(params=model[2].parameters(), **kwargs)])


def test_invalid_hyperparameters_of_sam_and_second_moment():
    with pytest.raises(ValueError, match="rho"):
        SAM(make_model().parameters(), AdamCM, rho=-0.1)
    with pytest.raises(ValueError, match="lr"):
        SAM(make_model().parameters(), AdamCM, lr=-1.0)
    with pytest.raises(ValueError, match="second_moment"):
        AdamCM(make_model().parameters(), second_moment="squared")
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(make_model().parameters(), torch.optim.Adam(make_model().parameters()))
    opt = SAM(make_model().parameters(), AdamCM)
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(2))], rho=-1.0))


def test_lr_scheduler_and_closure(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 3 else 0.0)
    for t in range(3):
        closure = closure_for(model, opt, t)
        x, y = batch(t)
        with torch.no_grad():
            expected = nn.functional.mse_loss(model(x), y)
        loss = opt.step(closure)
        assert torch.allclose(loss, expected), "step(closure) returns the closure's loss at θ"
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = flat(model).clone()
    train(model, opt, 3, start=3)
    assert torch.equal(flat(model), before), "lr 0 from the scheduler must stop the parameters"


def test_state_dict_resumes_bit_identically_and_loads_weights_only(name, tmp_path):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, opt, 7)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    model2 = make_model(seed=99)
    opt2 = OPTIMIZERS[name](model2.parameters(), lr=1e-2, weight_decay=0.01)
    ckpt = torch.load(path, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    buf, buf2 = buffered(opt), buffered(opt2)
    if buf is not None:
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert_state_equal(buf.state[p], buf2.state[p2])
            assert "buffer" in buf2.state[p2], "the buffer comes back from a checkpoint"

    train(model, opt, 6, start=7)
    train(model2, opt2, 6, start=7)
    assert torch.equal(flat(model), flat(model2))
    if buf is not None:
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert_state_equal(buf.state[p], buf2.state[p2])


def test_pickling_model_and_optimizer_together_continues_identically(name):
    """copy.deepcopy and pickle (Avalanche's checkpoints) keep the whole state."""
    import copy

    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    train(model, opt, 6)
    model2, opt2 = copy.deepcopy((model, opt))
    assert getattr(opt2, "skipped_steps") == 0
    train(model, opt, 5, start=6)
    train(model2, opt2, 5, start=6)
    assert torch.equal(flat(model), flat(model2))
    buf, buf2 = buffered(opt), buffered(opt2)
    if buf is not None:
        s1, s2 = buf.buffer_stats(), buf2.buffer_stats()
        assert s1.keys() == s2.keys()
        assert all(s1[k] == s2[k] or (math.isnan(s1[k]) and math.isnan(s2[k])) for k in s1)
        if isinstance(opt2, SAM):
            assert opt2.state is opt2.base_optimizer.state
            assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_add_param_group_gets_its_own_buffers(name):
    model = make_model()
    opt = OPTIMIZERS[name](model[0].parameters())
    train(model, opt, 4)
    opt.add_param_group({"params": model[2].parameters()})
    before = flat(model).clone()
    train(model, opt, 4, start=4)
    new_params = list(model[2].parameters())
    assert all(not torch.equal(p.detach(), b) for p, b in
               zip(new_params, [before[-33:-3].view(3, 10), before[-3:]]))
    buf = buffered(opt)
    if buf is not None:
        for p in new_params:
            st = buf.state[p]
            assert st["buffer"].shape == (5, *p.shape)
            assert 1 <= len(st["priority"]) <= 5
        assert buf.state[new_params[0]]["priority"] == buf.state[new_params[1]]["priority"]


def test_parameter_appended_to_a_group_gets_zero_rows(name):
    """Avalanche's update_optimizer appends a new head's parameters to group 0."""
    model = make_model()
    head = nn.Linear(10, 2)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 6)
    opt.param_groups[0]["params"].extend(head.parameters())
    buf = buffered(opt)
    n_before = len(buf.state[model[0].weight]["priority"]) if buf else 0
    x, _ = batch(0)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean() + head(torch.tanh(model[0](x))).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    if buf is not None:
        st = buf.state[head.weight]
        assert st["priority"] == buf.state[model[0].weight]["priority"]
        assert st["buffer"].shape == (5, 2, 10)
        # rows stored before the head existed are zero
        zero_rows = sum(bool((row == 0).all()) for row in st["buffer"][: len(st["priority"])])
        assert zero_rows >= n_before - 1
    assert torch.isfinite(head.weight).all()


def test_nonfinite_gradients_leave_state_unpoisoned(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 6)
    params_before = flat(model).clone()
    buf = buffered(opt)
    snapshot = {p: {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in st.items()}
                for p, st in opt.state.items()}
    x, y = batch(6)
    for bad in (float("nan"), float("inf")):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            model[0].weight.grad[0, 0] = bad
            return loss

        with pytest.warns(RuntimeWarning, match="skipped"):
            opt.step(closure)
    assert torch.equal(flat(model), params_before)
    for p, st in opt.state.items():
        assert_state_equal(st, snapshot[p])
    skipped = getattr(opt, "skipped_steps")
    assert skipped == 2
    if buf is not None:
        assert buf.buffer_stats()["skipped_steps"] == (2 if buf is opt else 0)
    train(model, opt, 2, start=7)
    assert torch.isfinite(flat(model)).all()


def _scaled_step(model, opt, scaler, t, poison=False):
    x, y = batch(t)
    if isinstance(opt, SAM):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        opt.first_step(zero_grad=True)
    else:
        opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def test_grad_scaler(name):
    model, ref = make_model(), make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    ref_opt = OPTIMIZERS[name](ref.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for t in range(5):
        _scaled_step(model, opt, scaler, t)
        ref_opt.step(closure_for(ref, ref_opt, t))
    torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)
    before = flat(model).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _scaled_step(model, opt, scaler, 5, poison=True)
    assert torch.equal(flat(model), before), "an overflowing step must leave θ as it was"
    assert scaler.get_scale() == 2.0**9
    _scaled_step(model, opt, scaler, 6)
    assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), before)


def test_converges_on_a_convex_quadratic(name):
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    a = q @ torch.diag(torch.linspace(0.5, 5.0, 8)) @ q.T
    b = torch.randn(8)
    solution = torch.linalg.solve(a, b)
    x = nn.Parameter(torch.zeros(8))
    opt = OPTIMIZERS[name]([x], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1500)

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ a @ x - b @ x
        loss.backward()
        return loss

    for _ in range(1500):
        opt.step(closure)
        sched.step()
    assert torch.linalg.vector_norm(x.detach() - solution) < 1e-2


def test_trains_a_small_mlp(name):
    """A student MLP fits a teacher of the same architecture."""
    torch.manual_seed(0)
    x = torch.randn(128, 6)
    with torch.no_grad():
        y = make_model(seed=123)(x)
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure())
    for _ in range(400):
        opt.step(closure)
    assert float(closure()) < 0.1 * first


def test_trains_in_each_declared_dtype(name):
    """Every parameter dtype a variant declares trains, with moments in that dtype."""
    variant = OPTIMIZERS[name]
    for dtype in variant.dtypes:
        torch.manual_seed(0)
        x = torch.randn(64, 6, dtype=dtype)
        y = (x.float() @ torch.randn(6, 3)).to(dtype)
        model = make_model().to(dtype)
        opt = variant(model.parameters(), lr=1e-2)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            return loss

        first = float(closure().detach())
        for _ in range(60):
            opt.step(closure)
        assert float(closure().detach()) < 0.5 * first, dtype
        assert all(opt.state[p]["exp_avg"].dtype == dtype for p in model.parameters()), dtype


def test_avalanche_style_state_reset(name):
    """Avalanche's reset_optimizer_state assigns a fresh ``optimizer.state``."""
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt, 4)
    opt.state = defaultdict(dict)
    assert len(opt.state) == 0
    buf = buffered(opt)
    if buf is not None:
        assert buf.buffer_stats()["size"] == 0
    train(model, opt, 2, start=4)
    if buf is not None:
        assert buf.buffer_stats()["size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(name):
    model = make_model()
    gpu_model = make_model().cuda()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    gpu_opt = OPTIMIZERS[name](gpu_model.parameters(), lr=1e-2)
    for t in range(10):
        opt.step(closure_for(model, opt, t))
        x, y = (v.cuda() for v in batch(t))

        def closure():
            gpu_opt.zero_grad()
            loss = nn.functional.mse_loss(gpu_model(x), y)
            loss.backward()
            return loss

        gpu_opt.step(closure)
    torch.testing.assert_close(flat(gpu_model).cpu(), flat(model), rtol=1e-4, atol=1e-5)
