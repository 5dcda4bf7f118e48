"""cl_cm.make_optimizer and friends: every optimizer by name, every
constructor argument reachable, each default read from its class."""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import cl_cm
from cl_cm import OPTIMIZERS, SAM, AdamCG, AdamCM, buffered, has_buffer, make_optimizer, optimizer_options

EXPECTED = {  # name -> (class of the optimizer, class of its base optimizer, has a buffer)
    "sgd": (torch.optim.SGD, torch.optim.SGD, False),
    "adam": (torch.optim.AdamW, torch.optim.AdamW, False),
    "adam_cg": (AdamCG, AdamCG, True),
    "adam_sam": (SAM, torch.optim.AdamW, False),
    "adam_cm": (AdamCM, AdamCM, True),
    "adam_cm_sam": (SAM, AdamCM, True),
}


def model():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_every_name_builds_its_optimizer():
    assert set(OPTIMIZERS) == set(EXPECTED)
    for name, (cls, base, has) in EXPECTED.items():
        opt = make_optimizer(name, model().parameters())
        assert type(opt) is cls
        assert type(opt.base_optimizer if isinstance(opt, SAM) else opt) is base
        assert has_buffer(name) is has
        assert (buffered(opt) is not None) is has
        if has:
            assert buffered(opt) is (opt.base_optimizer if isinstance(opt, SAM) else opt)


def test_defaults_come_from_the_classes_and_reach_every_argument():
    for name, (_, base, _) in EXPECTED.items():
        options = optimizer_options(name)
        own = {k: p.default for k, p in inspect.signature(base.__init__).parameters.items()
               if k not in ("self", "params")}
        assert set(own) <= set(options), f"{name} misses {set(own) - set(options)}"
        changed = {k for k in own if options[k] != own[k]}
        assert changed <= {"lr", "weight_decay"}, (name, changed)
    assert optimizer_options("adam")["weight_decay"] == 0.0  # AdamW's default is 0.01
    assert optimizer_options("sgd")["lr"] == 0.01
    for name in ("adam_sam", "adam_cm_sam"):
        assert optimizer_options(name)["rho"] == inspect.signature(SAM).parameters["rho"].default
        assert "adaptive" in optimizer_options(name)
    cm = optimizer_options("adam_cm")
    assert {"betas", "eps", "compiled", "reference_compat", "foreach", "fused", "buffer_dtype",
            "second_moment"} <= set(cm)


def test_arguments_reach_the_optimizer():
    """What experiments pass (including betas as a list from a settings file
    and buffer_dtype by name) arrives in the param groups."""
    opt = make_optimizer("adam_cm_sam", model().parameters(), lr=3e-3, weight_decay=0.1, buffer_size=4,
                         decay=0.8, kappa=0.5, second_moment="gradient", rho=0.1, adaptive=True,
                         betas=[0.8, 0.99], eps=1e-6, buffer_dtype="bfloat16", reference_compat=False,
                         foreach=True)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["buffer_size"], group["decay"], group["kappa"]) == \
        (3e-3, 0.1, 4, 0.8, 0.5)
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["foreach"] is True
    assert group["buffer_dtype"] == torch.bfloat16 and group["rho"] == 0.1 and group["adaptive"] is True
    sgd = make_optimizer("sgd", model().parameters(), momentum=0.9, nesterov=True)
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["lr"] == 0.01
    for name in ("int8", "8bit"):
        assert make_optimizer("adam_cm", model().parameters(), buffer_dtype=name).param_groups[0][
            "buffer_dtype"] == torch.int8


def test_unknown_names_and_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="adam_cm_sam"):
        make_optimizer("adam_cmm", model().parameters())
    with pytest.raises(ValueError, match="takes: .*buffer_size"):
        make_optimizer("adam_cm", model().parameters(), buffer=3)
    with pytest.raises(ValueError, match="momentum"):
        make_optimizer("adam", model().parameters(), momentum=0.9)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        has_buffer("lion")


def test_buffered_of_optimizers_without_a_buffer_is_none():
    assert buffered(torch.optim.Adam(model().parameters())) is None
    assert buffered(SAM(model().parameters(), torch.optim.SGD, lr=0.1)) is None
    assert cl_cm.buffered(AdamCG(model().parameters())) is not None


def test_strategies_reexports_the_registry():
    strategies = pytest.importorskip("strategies")
    assert strategies.make_optimizer is make_optimizer
    assert strategies.OPTIMIZERS is OPTIMIZERS and strategies.optimizer_options is optimizer_options
