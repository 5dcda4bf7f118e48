"""The base optimizer of Adam+CM and Adam+CG: everything but the update rule.

:class:`CriticalBufferOptimizer` gathers each group's tensors, computes the
priorities (step 5 of Adam+CM's Alg. 1) with one host sync per step, chooses
the buffer slot (step 6), lets the subclass update the parameters and write
the entries (steps 1–4 and 6, :meth:`~CriticalBufferOptimizer._update`),
decays the priorities (step 7), and owns checkpoints, the buffer controls
(reset, decay, resize) and the buffer statistics. The buffer's layout and
plain functions are in :mod:`cl_cm.buffer`.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import buffer
from .norms import local_view, reduce_shards, squared_norms
from .torch_adam import Workspace, implementation

#: param_group keys that only other optimizers have: a state dict whose groups
#: carry one of them (and that this class does not take) comes from another optimizer.
_KNOWN_KEYS = frozenset({"amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay",
                         "momentum", "dampening", "nesterov", "second_moment", "reference_compat", "compiled"})
#: param_group keys added after the first release, with the value older checkpoints mean
_LATER_KEYS = {"foreach": None, "fused": None, "buffer_dtype": None, "compiled": False,
               "reference_compat": False}


@dataclass
class GroupTensors:
    """One group's parameters with state, for one step. Those with a gradient
    are updated; the others (grad None) only get this step's row of the buffer
    (their unchanged momentum, or a zero gradient), so that row i of every
    parameter belongs to the same step."""

    params: list[Tensor] = field(default_factory=list)         # this rank's shard of each parameter
    grads: list[Tensor | None] = field(default_factory=list)   # None: no gradient this step
    shard_groups: list = field(default_factory=list)           # per param: process group it is sharded over, or None
    states: list[dict] = field(default_factory=list)           # their states
    priority: list[float] = field(default_factory=list)        # the group's priorities

    @property
    def stepped(self) -> bool:
        return any(g is not None for g in self.grads)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _finite_at_least(name: str, value: Any, low: float, example: str) -> None:
    if not _is_real(value) or not (math.isfinite(value) and value >= low):
        raise ValueError(f"Invalid {name}: {value!r}. {name} must be a finite number >= {low:g}, e.g. {example}.")


def check_hyperparameters(group: dict) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of
    ``group`` and its valid range; normalise ``buffer_dtype`` in place."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"Invalid lr: a tensor lr must hold one floating-point value, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}.")
        lr = float(lr)
    _finite_at_least("lr", lr, 0.0, "lr=1e-3")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}. betas must be a pair (beta1, beta2), e.g. (0.9, 0.999).")
    for i, beta in enumerate(betas):
        if not _is_real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta!r}. Each beta must lie in [0, 1), e.g. (0.9, 0.999).")
    _finite_at_least("eps", group["eps"], 0.0, "eps=1e-8")
    _finite_at_least("weight_decay", group["weight_decay"], 0.0, "weight_decay=0.01")
    size = group["buffer_size"]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"Invalid buffer_size: {size!r}. buffer_size must be an int >= 0 "
                         "(0 turns the buffer off), e.g. buffer_size=5.")
    decay = group["decay"]
    if not _is_real(decay) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay: {decay!r}. decay (lambda) must lie in [0, 1], e.g. decay=0.7.")
    _finite_at_least("kappa", group["kappa"], 0.0, "kappa=1.0")
    group["buffer_dtype"] = buffer.as_buffer_dtype(group["buffer_dtype"])
    for flag in ("foreach", "fused"):
        if group[flag] is not None and not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r}. Use None, True or False.")
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid foreach/fused: choose at most one of foreach=True and fused=True.")


class CriticalBufferOptimizer(Optimizer):
    """Base class of :class:`~cl_cm.AdamCM` and :class:`~cl_cm.AdamCG`.

    It owns the buffer (state layout, slot choice, priority decay, resizing,
    statistics, checkpoints) and the step's skeleton; a subclass supplies the
    update (:meth:`_update`: steps 1–4, and the write of this step's entry,
    which its functional form does for every parameter of the group).

    A step whose gradients contain NaN or Inf is **skipped and counted**: no
    parameter, moment or buffer changes, :attr:`skipped_steps` grows by one and
    a ``RuntimeWarning`` is issued. This matches what ``torch.amp.GradScaler``
    does with an overflowing step. Finite gradients never look infinite: the
    norms are safe from float32 overflow (see :func:`cl_cm.norms.squared_norms`).
    """

    #: param_group keys that identify the subclass's state dicts (with buffer_size, decay and kappa)
    _identity_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, *, lr, betas, eps, weight_decay, buffer_size, decay, kappa,
                 buffer_dtype, foreach, fused, **own) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, buffer_size=buffer_size,
                        decay=decay, kappa=kappa, buffer_dtype=buffer_dtype, foreach=foreach, fused=fused, **own)
        self._check_group(defaults)
        #: Number of steps skipped because a gradient was NaN or Inf.
        self.skipped_steps = 0
        self._counts = {"full": 0, "replaced": 0}
        self._workspace = Workspace()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict) -> None:
        check_hyperparameters(group)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; its parameters get their own buffers when they first
        receive a gradient (as Avalanche does when a model grows)."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _group_states(self, group: dict) -> list[dict]:
        return [st for p in group["params"] if (st := self.state.get(p)) and "step" in st]

    def _group_priority(self, group: dict) -> list[float]:
        states = self._group_states(group)
        return states[0]["priority"] if states else []

    def _init_state(self, p: Tensor, state: dict, group: dict, priority: list[float]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["buffer_size"]:
            # Rows of entries stored before this parameter existed are zeros:
            # its momentum and gradient were zero then.
            state.update(buffer.allocate(p, group["buffer_size"], group["buffer_dtype"]))
            state["buffer_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["priority"] = priority

    def _gather(self, group: dict) -> GroupTensors:
        out = GroupTensors(priority=self._group_priority(group))
        for p in group["params"]:
            grad = p.grad
            state = self.state.get(p)
            if grad is None:
                if not (state and "step" in state):
                    continue
            else:
                if grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: use dense "
                        "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam.")
                if torch.is_complex(p):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters.")
                state = self.state[p]
            local, shard_group = local_view(p)
            if "step" not in state:
                self._init_state(local, state, group, out.priority)
            out.params.append(local)
            out.grads.append(None if grad is None else local_view(grad)[0])
            out.shard_groups.append(shard_group)
            out.states.append(state)
        capacity = group["buffer_size"]
        if any(buffer.capacity(st) != capacity for st in out.states):
            buffer.fit(out.states, capacity, group["buffer_dtype"])
            out.priority = out.states[0]["priority"]
        return out

    # -------------------------------------------------------------------- step
    def _priority(self, group: dict, squared_norms: list[float]) -> float:
        """Step 5 of Alg. 1: p_t = ‖g_t‖₂, the norm of the group's whole
        gradient, from the squared norms of its tensors."""
        return math.sqrt(sum(squared_norms))

    def _priorities(self, work: list[GroupTensors]) -> list[float | None]:
        """The priority of every group with gradients, from one gathered set of
        norms (one host sync per step). Under FSDP2 every rank holds a shard of
        each gradient: the shards' squared norms are summed over the ranks with
        one all-reduce, so that every rank takes the same decisions."""
        pairs = [[(g, s) for g, s in zip(w.grads, w.shard_groups) if g is not None] for w in work]
        flat = iter(squared_norms([g for ps in pairs for g, _ in ps], [s for ps in pairs for _, s in ps]))
        return [self._priority(group, [next(flat) for _ in ps]) if ps else None
                for group, ps in zip(self.param_groups, pairs)]

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [self._gather(group) for group in self.param_groups]
        priorities = self._priorities(work)
        if any(p is not None and not math.isfinite(p) for p in priorities):
            self.skipped_steps += 1
            warnings.warn(
                f"{type(self).__name__}: skipped a step with NaN/Inf gradients "
                f"(optimizer.skipped_steps = {self.skipped_steps}); parameters, moments and "
                "buffer are unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        for group, w, p_t in zip(self.param_groups, work, priorities):
            if w.stepped:
                self._step_group(group, w, p_t)
        return loss

    def _step_group(self, group: dict, w: GroupTensors, p_t: float) -> None:
        capacity = group["buffer_size"]
        slot, replace = buffer.choose_slot(w.priority, p_t, capacity) if capacity else (None, False)
        self._update(group, w, slot, replace)  # steps 1–4 and the write of step 6
        if not capacity:
            return
        if len(w.priority) >= capacity:
            self._counts["full"] += 1
            self._counts["replaced"] += slot is not None
        priority = buffer.record(w.priority, slot, p_t, group["decay"])  # steps 6–7
        for st in w.states:
            st["priority"] = priority

    def _implementation(self, group: dict, params: list[Tensor]) -> tuple[bool, bool]:
        return implementation(group, params)

    def _tensors(self, group: dict, w: GroupTensors, slot: int | None) -> dict:
        """The arguments that the functional updates (:func:`~cl_cm.adam_cm`,
        :func:`~cl_cm.adam_cg`) take: the group's tensors and numbers. The
        buffer enters through buffer_weight = κ/|B| and buffer_sums = ΣB, and
        this step's entry goes to row ``slot`` of ``buffers``."""
        n = len(w.priority)
        beta1, beta2 = group["betas"]
        has_buffer = group["buffer_size"] > 0
        return dict(params=w.params, grads=w.grads, exp_avgs=[st["exp_avg"] for st in w.states],
                    exp_avg_sqs=[st["exp_avg_sq"] for st in w.states],
                    buffer_sums=[st["buffer_sum"] for st in w.states] if has_buffer else [],
                    state_steps=[st["step"] for st in w.states],
                    buffer_weight=group["kappa"] / n if n else 0.0, lr=float(group["lr"]), beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    buffers=[st["buffer"] for st in w.states] if has_buffer else None,
                    buffer_scales=([st["buffer_scale"] for st in w.states]
                                   if has_buffer and "buffer_scale" in w.states[0] else None),
                    slot=slot)

    def _update(self, group: dict, w: GroupTensors, slot: int | None, replace: bool) -> None:
        """Update the parameters that have a gradient (steps 1–4) and, if
        ``slot`` is not None, write every parameter's entry into row ``slot``
        of its buffer (replacing an entry if ``replace``; step 6)."""
        raise NotImplementedError

    # --------------------------------------------------------- checkpointing
    def __getstate__(self) -> dict:
        # pickling (copy.deepcopy, Avalanche's checkpoints) keeps the counters;
        # the scratch workspace is rebuilt
        state = {**super().__getstate__(), "skipped_steps": self.skipped_steps, "_counts": dict(self._counts)}
        state.pop("_workspace", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("skipped_steps", 0)
        state.setdefault("_counts", {"full": 0, "replaced": 0})
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _LATER_KEYS.items():
                if key in self.defaults:
                    group.setdefault(key, value)
        self._workspace = Workspace()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, buffers included.

        What torch's Adam accepts loads here too: a ``step`` saved as a number
        (older torch), an lr saved as a tensor, parameters without state. The
        state dict is checked first, and refused with a ``ValueError`` (this
        optimizer unchanged) if it comes from another optimizer class, or if a
        state's buffer does not match its parameter or its priority list.

        torch casts floating-point state tensors to the parameter's dtype; the
        buffer and its scales keep their own dtype here, and ``step`` stays a
        CPU float32 tensor, where the host reads it without a device sync.
        """
        groups, saved_groups = self.param_groups, state_dict.get("param_groups")
        if (not isinstance(saved_groups, list) or len(groups) != len(saved_groups)
                or any(len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved_groups))):
            super().load_state_dict(state_dict)  # torch's own error for a state dict that does not fit
            return
        self._check_state_dict(state_dict)
        kept: dict = {}
        state = {}
        for key, value in state_dict["state"].items():
            if isinstance(value, dict):
                kept[key] = {k: value[k] for k in ("buffer", "buffer_scale") if k in value}
                value = {k: v for k, v in value.items() if k not in kept[key]}
            state[key] = value
        super().load_state_dict({**state_dict, "state": state})
        params = [p for g in self.param_groups for p in g["params"]]
        index = {key: i for i, key in enumerate(k for s in saved_groups for k in s["params"])}
        for key, tensors in kept.items():
            p = params[index[key]]
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            local = local_view(p)[0]
            for k, t in tensors.items():
                dtype = t.dtype
                if k == "buffer" and t.dtype != buffer.INT8:  # a floating buffer follows buffer_dtype or the parameter
                    dtype = group["buffer_dtype"] or local.dtype
                self.state[p][k] = t.to(local.device, dtype)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:
                    step = st["step"]
                    st["step"] = (step.detach().to("cpu", torch.float32) if isinstance(step, Tensor)
                                  else torch.tensor(float(step), dtype=torch.float32))
                    st["priority"] = [float(q) for q in st.get("priority", [])]
            self._share_priorities(group)

    def _share_priorities(self, group: dict) -> None:
        states = self._group_states(group)
        if states:
            shared = states[0]["priority"]
            for st in states:
                st["priority"] = shared

    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuse (``ValueError``) a state dict that this optimizer must not load."""
        name = type(self).__name__
        required = {"buffer_size", "decay", "kappa", *self._identity_keys}
        foreign = _KNOWN_KEYS - set(self.defaults)
        dtypes = []
        for saved in state_dict["param_groups"]:
            missing = sorted(required - set(saved))
            extra = sorted(foreign & set(saved))
            if missing or extra:
                has = f" and have {', '.join(map(repr, extra))}" if extra else ""
                lack = f" lack {', '.join(map(repr, missing))}" if missing else ""
                raise ValueError(
                    f"{name}.load_state_dict: this state dict comes from another optimizer (its param_groups"
                    f"{lack}{has}). Load it into the optimizer class that saved it; {name} is unchanged.")
            group = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._check_group(group)
            except ValueError as err:
                raise ValueError(f"{name}.load_state_dict: the saved param_groups are invalid: {err} "
                                 f"{name} is unchanged.") from None
            dtypes.append(group["buffer_dtype"])
        params = {key: p for saved, group in zip(state_dict["param_groups"], self.param_groups)
                  for key, p in zip(saved["params"], group["params"])}
        try:
            for saved, dtype in zip(state_dict["param_groups"], dtypes):
                priorities = []
                for key in saved["params"]:
                    st = state_dict["state"].get(key)
                    if st:
                        _check_param_state(st, local_view(params[key])[0], dtype)
                        if "priority" in st:
                            priorities.append([float(q) for q in st["priority"]])
                if any(q != priorities[0] for q in priorities):
                    raise ValueError("the parameters of a group hold different priority lists; they must share one")
        except ValueError as err:
            raise ValueError(f"{name}.load_state_dict: {err}. {name} is unchanged.") from None

    # ---------------------------------------------------------- buffer control
    def reset_buffer(self) -> None:
        """Empty every buffer (capacity unchanged); moments are kept."""
        for group in self.param_groups:
            empty: list[float] = []
            for st in self._group_states(group):
                st["priority"] = empty
                if "buffer_sum" in st:
                    st["buffer_sum"].zero_()

    @torch.no_grad()
    def decay_buffer(self, factor: float) -> None:
        """Scale every stored entry and its priority by ``factor`` in [0, 1]:
        old entries weigh less in mean(B) and are replaced sooner."""
        if not _is_real(factor) or not 0.0 <= factor <= 1.0:
            raise ValueError(f"Invalid factor: {factor!r}. decay_buffer needs a factor in [0, 1].")
        for group in self.param_groups:
            states = self._group_states(group)
            if not states:
                continue
            priority = states[0]["priority"]
            scaled = [q * factor for q in priority]
            for st in states:
                if priority and "buffer" in st:
                    buffer.scale_rows_(st, len(priority), factor)
                st["priority"] = scaled

    @torch.no_grad()
    def resize_buffer(self, size: int | Sequence[int]) -> None:
        """Set the capacity to ``size`` (one int for every group, or one per
        group), keeping the highest-priority entries; 0 turns the buffer off
        and frees its memory."""
        sizes = list(size) if isinstance(size, (list, tuple)) else [size] * len(self.param_groups)
        if len(sizes) != len(self.param_groups):
            raise ValueError(f"Invalid buffer_size: {size!r}. Give one int, or one per parameter group "
                             f"({len(self.param_groups)}).")
        for n in sizes:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
                raise ValueError(f"Invalid buffer_size: {n!r}. resize_buffer needs an int >= 0.")
        for group, n in zip(self.param_groups, sizes):
            group["buffer_size"] = int(n)
            buffer.fit(self._group_states(group), int(n), group["buffer_dtype"])
            self._share_priorities(group)

    @torch.no_grad()
    def reset_moments(self) -> None:
        """Zero Adam's moments (m, v) and step counts, keeping the buffer: a
        fresh Adam start whose memory of critical entries survives."""
        for group in self.param_groups:
            for st in self._group_states(group):
                st["exp_avg"].zero_()
                st["exp_avg_sq"].zero_()
                st["step"].zero_()

    @torch.no_grad()
    def buffer_stats(self, reset: bool = True) -> dict[str, float]:
        """Diagnostics of the buffers, summed or averaged over groups.

        ``reset=False`` leaves the replacement counters running (for a peek that
        must not disturb a metric's window).

        * ``size``, ``capacity``: stored entries and slots, summed over groups;
        * ``mean_priority``: mean priority of the stored entries (NaN if none);
        * ``replacement_rate``: among the steps since the last call at which a
          buffer was full, the fraction whose new entry replaced the
          lowest-priority one (NaN if no buffer was full);
        * ``exploration``: ‖mean(B)‖ / ‖m‖, the size of the buffer term
          relative to Adam's momentum, over all parameters (0 when empty);
        * ``cosine_similarity``: mean pairwise cosine similarity of the stored
          entries of a group (whole-group vectors), the paper's gradient
          cancellation diagnostic (NaN with fewer than 2 entries);
        * ``skipped_steps``: steps skipped for NaN/Inf gradients so far.
        """
        size = capacity = 0
        priorities: list[float] = []
        momentum_sq = mean_sq = 0.0
        cos_sum, pairs = 0.0, 0
        for group, sums in zip(self.param_groups, self._stat_sums()):
            capacity += group["buffer_size"]
            if sums is None:
                continue
            priority, (m_sq, b_sq, gram) = sums
            n = len(priority)
            size += n
            priorities += priority
            momentum_sq += m_sq
            if not n:
                continue
            mean_sq += b_sq / n**2
            if n >= 2:
                diag = gram.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
                cos = gram / diag[:, None] / diag[None, :]
                iu = torch.triu_indices(n, n, offset=1)
                cos_sum += float(cos[iu[0], iu[1]].sum())
                pairs += n * (n - 1) // 2
        m_norm, b_norm = math.sqrt(momentum_sq), math.sqrt(mean_sq)
        full, replaced = self._counts["full"], self._counts["replaced"]
        if reset:
            self._counts = {"full": 0, "replaced": 0}
        return {
            "size": size,
            "capacity": capacity,
            "mean_priority": sum(priorities) / len(priorities) if priorities else math.nan,
            "replacement_rate": replaced / full if full else math.nan,
            "exploration": (b_norm / m_norm if m_norm > 0 else math.nan) if size else 0.0,
            "cosine_similarity": cos_sum / pairs if pairs else math.nan,
            "skipped_steps": self.skipped_steps,
        }

    def _stat_sums(self) -> list[tuple[list[float], tuple[float, float, Tensor]] | None]:
        """Per group: its priorities and (Σ‖m‖², ‖ΣB‖², Gram matrix of the
        stored entries), sums over the group's parameters in float64 (None for
        a group without state). Under FSDP2 each rank holds shards: the sharded
        parameters' parts are summed over the ranks with one all-reduce, so
        that every rank reports the statistics of the whole model (every rank
        must then call :meth:`buffer_stats`, as it calls ``step``)."""
        parts: list[Tensor] = []  # per parameter with state: [‖m‖², ‖ΣB‖², its Gram matrix of the entries]
        shards: list = []         # per entry of ``parts``: the process group of its parameter's shard
        layout: list = []         # per group: (priority, number of parameters), or None
        for group in self.param_groups:
            members = [(p, st) for p in group["params"] if (st := self.state.get(p)) and "step" in st]
            if not members:
                layout.append(None)
                continue
            priority = members[0][1]["priority"]
            n = len(priority)
            for p, st in members:
                part = torch.zeros(2 + n * n, dtype=torch.float64, device=st["exp_avg"].device)
                part[0] = st["exp_avg"].double().pow(2).sum()
                if n:
                    part[1] = st["buffer_sum"].double().pow(2).sum()
                    part[2:] = buffer.gram(buffer.rows(st, n, torch.float64)).reshape(-1)
                parts.append(part)
                shards += [local_view(p)[1]] * part.numel()
            layout.append((priority, len(members)))
        totals = iter(reduce_shards(torch.cat(parts), shards).cpu().split(
            [t.numel() for t in parts]) if parts else [])
        result = []
        for entry in layout:
            if entry is None:
                result.append(None)
                continue
            priority, count = entry
            n = len(priority)
            total = sum(next(totals) for _ in range(count))
            result.append((priority, (float(total[0]), float(total[1]), total[2:].reshape(n, n))))
        return result

    def buffer_nbytes(self) -> int:
        """Bytes held by the stored entries (``buffer``, and ``buffer_scale`` of the 8-bit buffer)."""
        return sum(st[k].numel() * st[k].element_size()
                   for st in self.state.values() for k in ("buffer", "buffer_scale") if k in st)


def _check_param_state(st: Any, p: Tensor, buffer_dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` if one parameter's saved state does not fit it."""
    if not isinstance(st, dict):
        raise ValueError(f"a parameter's state is a {type(st).__name__}, not a dict")
    shape = tuple(p.shape)
    for key in ("exp_avg", "exp_avg_sq", "buffer_sum"):
        if key in st and (not isinstance(st[key], Tensor) or tuple(st[key].shape) != shape):
            raise ValueError(f"state {key!r} has shape {_shape(st[key])}, the parameter {shape}")
    step = st.get("step", 0)
    if not (isinstance(step, Tensor) and step.numel() == 1 or _is_real(step)) or not math.isfinite(float(step)):
        raise ValueError(f"state 'step' must be one finite number, got {step!r}")
    priority = st.get("priority", [])
    if not isinstance(priority, (list, tuple)) or not all(_is_real(q) and math.isfinite(q) and q >= 0
                                                          for q in priority):
        raise ValueError(f"state 'priority' must be a list of finite numbers >= 0, got {priority!r}")
    rows = st.get("buffer")
    if rows is None:
        if priority:
            raise ValueError(f"the state holds {len(priority)} priorities but no buffer")
        if "buffer_scale" in st:
            raise ValueError("the state holds buffer scales but no buffer")
        return
    if not isinstance(rows, Tensor) or tuple(rows.shape[1:]) != shape:
        raise ValueError(f"state 'buffer' has shape {_shape(rows)}; it must be (capacity, *{shape})")
    if len(priority) > rows.shape[0]:
        raise ValueError(f"the state holds {len(priority)} priorities for a buffer of {rows.shape[0]} rows")
    if "buffer_sum" not in st:
        raise ValueError("the state holds a buffer but no 'buffer_sum'")
    int8 = rows.dtype == buffer.INT8
    if int8 != (buffer_dtype == buffer.INT8):
        raise ValueError(f"state 'buffer' holds {rows.dtype} rows but the group's buffer_dtype is {buffer_dtype}")
    if not int8 and not rows.dtype.is_floating_point:
        raise ValueError(f"state 'buffer' holds {rows.dtype} rows; it must hold floating-point or int8 rows")
    scale = st.get("buffer_scale")
    if int8:
        expected = (rows.shape[0], -(-p.numel() // buffer.BLOCK))
        if not isinstance(scale, Tensor) or tuple(scale.shape) != expected:
            raise ValueError(f"state 'buffer_scale' has shape {_shape(scale)}; the 8-bit buffer needs {expected}")
    elif scale is not None:
        raise ValueError("the state holds 'buffer_scale' but its buffer is not the 8-bit buffer")


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
