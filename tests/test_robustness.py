"""Bad input is refused with a clear error before anything changes: invalid
hyperparameters, gradients that only look infinite, state dicts from another
optimizer or with a corrupt buffer. What torch's Adam accepts loads here too."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from cl_cm import SAM, AdamCG, AdamCM, make_optimizer

NAN, INF = float("nan"), float("inf")

# (argument, bad value, words of the valid range that the message must give)
BAD = [
    ("lr", NAN, ">= 0"), ("lr", INF, ">= 0"), ("lr", -1e-3, ">= 0"), ("lr", torch.tensor([1e-3, 1e-3]), "one"),
    ("eps", NAN, ">= 0"), ("eps", INF, ">= 0"), ("eps", -1.0, ">= 0"),
    ("weight_decay", NAN, ">= 0"), ("weight_decay", INF, ">= 0"), ("weight_decay", -0.1, ">= 0"),
    ("betas", (NAN, 0.999), "[0, 1)"), ("betas", (0.9, INF), "[0, 1)"), ("betas", (1.0, 0.999), "[0, 1)"),
    ("betas", (0.9, -0.1), "[0, 1)"), ("betas", (0.9,), "pair"),
    ("decay", NAN, "[0, 1]"), ("decay", INF, "[0, 1]"), ("decay", 1.5, "[0, 1]"), ("decay", -0.1, "[0, 1]"),
    ("kappa", NAN, ">= 0"), ("kappa", INF, ">= 0"), ("kappa", -1.0, ">= 0"),
    ("buffer_size", NAN, "int >= 0"), ("buffer_size", INF, "int >= 0"), ("buffer_size", -1, "int >= 0"),
    ("buffer_size", 2.5, "int >= 0"),
    ("buffer_dtype", torch.int32, "torch.int8"), ("buffer_dtype", "float17", "bfloat16"),
    ("foreach", "yes", "True"),
]


def params():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def message_of(err) -> str:
    return str(err.value)


@pytest.mark.parametrize("cls", [AdamCM, AdamCG], ids=["AdamCM", "AdamCG"])
@pytest.mark.parametrize("arg,value,valid", BAD, ids=[f"{a}={v!r}" for a, v, _ in BAD])
def test_bad_hyperparameters_are_refused_naming_the_argument_and_its_range(cls, arg, value, valid):
    with pytest.raises(ValueError) as err:
        cls(params().parameters(), **{arg: value})
    assert arg in message_of(err) and valid in message_of(err)
    model = params()  # in a group of its own, and added later
    with pytest.raises(ValueError, match=arg):
        cls([dict(params=model[0].parameters()), dict(params=model[2].parameters(), **{arg: value})])
    opt = cls(model[0].parameters())
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group(dict(params=model[2].parameters(), **{arg: value}))


@pytest.mark.parametrize("value", [NAN, INF, -0.1])
def test_bad_rho_and_make_optimizer_refuse_non_finite_numbers(value):
    with pytest.raises(ValueError, match="rho"):
        SAM(params().parameters(), AdamCM, rho=value)
    for name in ("sgd", "adam", "adam_sam", "adam_cg", "adam_cm", "adam_cm_sam"):
        with pytest.raises(ValueError, match="lr"):
            make_optimizer(name, params().parameters(), lr=NAN if value != -0.1 else INF)


def test_a_tensor_lr_is_accepted_as_torch_adam_accepts_it():
    a, b = params(), params()
    opt = AdamCM(a.parameters(), lr=torch.tensor(1e-2))
    ref = AdamCM(b.parameters(), lr=1e-2)
    for model, o in ((a, opt), (b, ref)):
        for t in range(3):
            o.zero_grad()
            model(torch.ones(2, 4) * (t + 1)).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------- overflow
def big_gradient_step(opt, p, value=2e19):
    p.grad = torch.zeros_like(p)
    p.grad[0] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a "skipped" warning would fail the test
        opt.step()


@pytest.mark.parametrize("cls", [AdamCM, AdamCG], ids=["AdamCM", "AdamCG"])
def test_a_finite_gradient_whose_float32_square_overflows_is_not_skipped(cls):
    """2e19² overflows float32; the step must still happen, with the exact
    float64 norm as priority."""
    p = nn.Parameter(torch.zeros(5))
    opt = cls([p], lr=1e-2, decay=1.0)
    big_gradient_step(opt, p)
    assert opt.skipped_steps == 0
    # the first step moves by η (Adam+CG) or η/(1 − β1) (Adam+CM: v from m², a known property of Alg. 1)
    expected = -1e-2 / (0.1 if cls is AdamCM else 1.0)
    assert float(p.detach()[0]) == pytest.approx(expected, rel=1e-4) and torch.isfinite(p.detach()).all()
    assert opt.state[p]["priority"] == [pytest.approx(2e19, rel=1e-7)]
    p.grad = torch.full_like(p, NAN)  # a real NaN is still skipped and counted
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1


def test_sam_perturbs_by_rho_with_a_gradient_whose_square_overflows():
    p = nn.Parameter(torch.zeros(5))
    opt = SAM([p], torch.optim.SGD, rho=0.5, lr=0.0)
    p.grad = torch.zeros_like(p)
    p.grad[0] = 3e19
    opt.first_step()
    assert float(p.detach()[0]) == pytest.approx(0.5, rel=1e-6)
    p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.second_step()
    assert opt.skipped_steps == 0 and float(p.detach()[0]) == 0.0


# -------------------------------------------------------- load_state_dict
def trained(cls, steps=5, **kw):
    model = params()
    opt = cls(model.parameters(), lr=1e-2, **kw)
    for t in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(t))).pow(2).sum().backward()
        opt.step()
    return model, opt


def assert_refused_and_unchanged(opt, state_dict, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(state_dict)
    assert "unchanged" in message_of(err)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][key][k]) if isinstance(v, torch.Tensor) else v == after["state"][key][k]


def still_steps(model, opt):
    opt.zero_grad()
    model(torch.ones(2, 4)).pow(2).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("source,target", [(torch.optim.Adam, AdamCM), (torch.optim.AdamW, AdamCM),
                                           (AdamCG, AdamCM), (AdamCM, AdamCG), (torch.optim.Adam, AdamCG)])
def test_a_state_dict_of_another_optimizer_class_is_refused(source, target):
    _, other = trained(source)
    model, opt = trained(target)
    assert_refused_and_unchanged(opt, other.state_dict(), "another optimizer")
    still_steps(model, opt)


CORRUPT = {
    "more priorities than rows": lambda st: st.update(priority=st["priority"] + [1.0] * 6),
    "priority not finite": lambda st: st.update(priority=[NAN] * len(st["priority"])),
    "buffer_sum of another shape": lambda st: st.update(buffer_sum=st["buffer_sum"].flatten()[:2]),
    "buffer rows of another shape": lambda st: st.update(buffer=st["buffer"][:, :1]),
    "priorities but no buffer": lambda st: st.pop("buffer"),
    "exp_avg of another shape": lambda st: st.update(exp_avg=st["exp_avg"].T.contiguous()),
    "step not a number": lambda st: st.update(step="seven"),
}


@pytest.mark.parametrize("corrupt", CORRUPT, ids=list(CORRUPT))
def test_a_state_whose_buffer_does_not_fit_is_refused(corrupt):
    _, source = trained(AdamCM)
    state = copy.deepcopy(source.state_dict())
    CORRUPT[corrupt](state["state"][0])
    model, opt = trained(AdamCM)
    assert_refused_and_unchanged(opt, state, "AdamCM.load_state_dict")
    still_steps(model, opt)


def test_priority_lists_that_differ_within_a_group_are_refused():
    _, source = trained(AdamCM)
    state = copy.deepcopy(source.state_dict())
    state["state"][1]["priority"] = [q * 2 for q in state["state"][1]["priority"]]
    model, opt = trained(AdamCM)
    assert_refused_and_unchanged(opt, state, "different priority lists")


def test_the_8bit_buffer_needs_its_scales():
    _, source = trained(AdamCM, buffer_dtype="int8")
    state = copy.deepcopy(source.state_dict())
    del state["state"][0]["buffer_scale"]
    model, opt = trained(AdamCM, buffer_dtype="int8")
    assert_refused_and_unchanged(opt, state, "buffer_scale")


def test_what_torch_adam_accepts_loads_as_torch_adam_loads_it():
    """A numeric step (torch's older format), a tensor lr and parameters
    without state load into AdamCM as into torch.optim.Adam; the result
    continues exactly as the optimizer that saved it."""
    model, opt = trained(AdamCM, steps=4)
    state = copy.deepcopy(opt.state_dict())
    for st in state["state"].values():
        st["step"] = float(st["step"])
    state["param_groups"][0]["lr"] = torch.tensor(1e-2)
    del state["state"][3]  # the last bias has no state yet (as if it never had a gradient)
    model2 = copy.deepcopy(model)
    opt2 = AdamCM(model2.parameters())
    opt2.load_state_dict(state)
    assert opt2.state[model2[0].weight]["step"].dtype == torch.float32
    assert model2[2].bias not in opt2.state or not opt2.state[model2[2].bias]
    ref = torch.optim.Adam(copy.deepcopy(model).parameters())
    ref_state = ref.state_dict()
    ref_state["state"] = {0: {"step": 4.0, "exp_avg": torch.zeros(3, 4), "exp_avg_sq": torch.zeros(3, 4)}}
    ref.load_state_dict(ref_state)  # torch accepts the same numeric step
    still_steps(model2, opt2)
    assert len(opt2.state[model2[2].bias]["priority"]) == len(opt2.state[model2[0].weight]["priority"])
