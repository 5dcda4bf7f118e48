"""The buffer of critical entries shared by Adam+CM and Adam+CG.

Each parameter group keeps up to C = ``buffer_size`` entries. An entry is a
copy of one past step's momentum (Adam+CM, Malviya et al. 2024, Alg. 1) or
gradient (Adam+CG, McRae et al. 2022, Alg. 1), stored with a *priority*: the
L2 norm of that step's gradient over the whole group, multiplied by ``decay``
(λ) after every step so that old entries fade. A new entry fills a free slot,
or replaces the lowest-priority entry when its own priority is higher.

How the buffer lives in the optimizer state (per parameter, lazily created as
torch's Adam does, plain tensors so that ``state_dict`` works and
``torch.load(weights_only=True)`` reads it):

* ``buffer``: a ``(C, *param.shape)`` tensor in ``buffer_dtype``; rows
  ``0..n-1`` are the stored entries;
* ``buffer_sum``: the sum of those n rows, kept up to date at every insertion so
  that mean(B) costs one read per step instead of C;
* ``priority``: a list of n floats. Every parameter of a group holds the same
  list, so the row ``i`` of every parameter belongs to the same step: the
  buffer of a group is one buffer of whole-model momenta, stored in slices.

Insertion decisions are taken on the host from one gathered norm per group, so
a step synchronises with the device once, whatever the number of tensors.
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

from . import _kernels

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class GroupTensors:
    """The tensors of one parameter group for one step."""

    params: list[Tensor] = field(default_factory=list)   # parameters with a gradient (this rank's shard)
    grads: list[Tensor] = field(default_factory=list)
    shard_groups: list = field(default_factory=list)     # per param: process group it is sharded over, or None
    states: list[dict] = field(default_factory=list)     # their states
    members: list[dict] = field(default_factory=list)    # every state holding buffer rows
    member_grads: list[Tensor | None] = field(default_factory=list)
    priority: list[float] = field(default_factory=list)  # the group's priorities
    slot: int | None = None      # where this step's entry goes (None: dropped), decided before the update
    occupied: bool = False       # whether that slot holds an entry to replace
    inserted: bool = False       # set by an update that wrote the entries of ``states`` itself


def choose_slot(priority: list[float], new_priority: float, capacity: int) -> tuple[int | None, bool]:
    """Where a new entry goes (step 6 of Adam+CM's Alg. 1).

    Returns ``(slot, occupied)``: the next free slot while |B| < C; otherwise the
    slot of the lowest priority if ``new_priority`` is strictly higher, else
    ``(None, False)`` and the entry is dropped.
    """
    n = len(priority)
    if n < capacity:
        return n, False
    if n == 0:
        return None, False
    lowest = min(range(n), key=priority.__getitem__)
    if new_priority > priority[lowest]:
        return lowest, True
    return None, False


def insert_entry(members: list[dict], entries: list[Tensor | None], slot: int,
                 occupied: bool, foreach: bool) -> None:
    """Write ``entries`` into row ``slot`` of every member's buffer and keep
    ``buffer_sum`` equal to the sum of the stored (dtype-rounded) rows.

    ``None`` entries store zeros (a parameter without a gradient this step).
    """
    rows = [st["buffer"][slot] for st in members]
    sums = [st["buffer_sum"] for st in members]
    if occupied:
        _sub_(sums, rows, foreach)
    if foreach and all(e is not None for e in entries):
        torch._foreach_copy_(rows, entries)
    else:
        for row, entry in zip(rows, entries):
            if entry is None:
                row.zero_()
            else:
                row.copy_(entry)
    _add_(sums, rows, foreach)


def _sub_(xs: list[Tensor], ys: list[Tensor], foreach: bool) -> None:
    if foreach and all(x.dtype == y.dtype for x, y in zip(xs, ys)):
        torch._foreach_sub_(xs, ys)
    else:
        for x, y in zip(xs, ys):
            x.sub_(y)


def _add_(xs: list[Tensor], ys: list[Tensor], foreach: bool) -> None:
    if foreach and all(x.dtype == y.dtype for x, y in zip(xs, ys)):
        torch._foreach_add_(xs, ys)
    else:
        for x, y in zip(xs, ys):
            x.add_(y)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_common_hyperparameters(group: dict) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group``."""
    lr = group["lr"]
    if isinstance(lr, Tensor) or not _is_real(lr) or not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr!r}. lr must be a float >= 0.")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}. betas must be a pair (beta1, beta2).")
    for i, beta in enumerate(betas):
        if not _is_real(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta!r}. Each beta must lie in [0, 1).")
    eps = group["eps"]
    if not _is_real(eps) or not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps!r}. eps must be >= 0.")
    wd = group["weight_decay"]
    if not _is_real(wd) or not wd >= 0.0:
        raise ValueError(f"Invalid weight_decay: {wd!r}. weight_decay must be >= 0.")
    size = group["buffer_size"]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise ValueError(f"Invalid buffer_size: {size!r}. buffer_size must be an int >= 0 (0 turns the buffer off).")
    decay = group["decay"]
    if not _is_real(decay) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid decay: {decay!r}. decay (lambda) must lie in [0, 1].")
    kappa = group["kappa"]
    if not _is_real(kappa) or not (math.isfinite(kappa) and kappa >= 0.0):
        raise ValueError(f"Invalid kappa: {kappa!r}. kappa must be a finite float >= 0.")
    dtype = group.get("buffer_dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Invalid buffer_dtype: {dtype!r}. Use None or a floating torch.dtype such as torch.bfloat16.")
    if group.get("foreach") and group.get("fused"):
        raise ValueError("Invalid foreach/fused: choose at most one of foreach=True and fused=True.")


class CriticalBufferOptimizer(Optimizer):
    """Base class of :class:`~cl_cm.AdamCM` and :class:`~cl_cm.AdamCG`.

    It owns the buffer (state layout, insertion, priority decay, resizing,
    statistics) and the step's skeleton; a subclass supplies the update rule
    (:meth:`_update`) and what an entry is (:meth:`_entries`).

    A step whose gradients contain NaN or Inf is **skipped and counted**: no
    parameter, moment or buffer changes, :attr:`skipped_steps` grows by one and
    a ``RuntimeWarning`` is issued. This matches what ``torch.amp.GradScaler``
    does with an overflowing step.
    """

    #: What an entry of the buffer is: "momentum" (Adam+CM) or "gradient" (Adam+CG).
    stores: str = ""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        self._check_group(defaults)
        #: Number of steps skipped because a gradient was NaN or Inf.
        self.skipped_steps = 0
        self._counts = {"full": 0, "replaced": 0}
        self._workspace = _kernels.Workspace()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict) -> None:
        check_common_hyperparameters(group)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; its parameters get their own buffers when they first
        receive a gradient (as Avalanche does when a model grows)."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _group_priority(self, group: dict) -> list[float]:
        for p in group["params"]:
            state = self.state.get(p)
            if state and "priority" in state:
                return state["priority"]
        return []

    def _group_states(self, group: dict) -> list[dict]:
        return [st for p in group["params"] if (st := self.state.get(p)) and "step" in st]

    def _init_state(self, p: Tensor, state: dict, group: dict, priority: list[float]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        capacity = group["buffer_size"]
        if capacity:
            # Rows of entries stored before this parameter existed are zeros:
            # its momentum and gradient were zero then.
            state["buffer"] = p.new_zeros((capacity, *p.shape), dtype=group["buffer_dtype"] or p.dtype)
            state["buffer_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["priority"] = priority

    def _gather(self, group: dict) -> GroupTensors:
        out = GroupTensors(priority=self._group_priority(group))
        for p in group["params"]:
            grad = p.grad
            if grad is not None:
                if grad.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients: use dense "
                        "gradients (e.g. nn.Embedding(sparse=False)) or torch.optim.SparseAdam.")
                if torch.is_complex(p):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters.")
                state = self.state[p]
                local, shard_group = _kernels.local_view(p)
                if "step" not in state:
                    self._init_state(local, state, group, out.priority)
                grad = _kernels.local_view(grad)[0]
                out.params.append(local)
                out.grads.append(grad)
                out.shard_groups.append(shard_group)
                out.states.append(state)
            else:
                state = self.state.get(p)
                if not state or "step" not in state:
                    continue
            out.members.append(state)
            out.member_grads.append(grad)
        capacity = group["buffer_size"]
        if any(_capacity(st) != capacity for st in out.members):
            self._fit_buffer(group, capacity, out.members)
            out.priority = self._group_priority(group)
        return out

    def _fit_buffer(self, group: dict, capacity: int, states: list[dict]) -> None:
        """Give every state ``capacity`` rows, keeping the highest-priority
        entries (in their order) and freeing the buffer when capacity is 0."""
        if not states:
            return
        priority = states[0]["priority"]
        ranked = sorted(range(len(priority)), key=lambda i: -priority[i])
        keep = sorted(ranked[:capacity])
        kept_priority = [priority[i] for i in keep]
        for st in states:
            old = st.get("buffer")
            if capacity == 0:
                st.pop("buffer", None)
                st.pop("buffer_sum", None)
            else:
                like = st["exp_avg"]
                new = like.new_zeros((capacity, *like.shape), dtype=group["buffer_dtype"] or like.dtype)
                if keep and old is not None:
                    new[: len(keep)] = old[keep]
                st["buffer"] = new
                st["buffer_sum"] = _row_sum(new, len(keep), like.dtype)
            st["priority"] = kept_priority

    # -------------------------------------------------------------------- step
    def _implementation(self, group: dict, params: list[Tensor]) -> tuple[bool, bool]:
        """(foreach, fused): torch's fused Adam kernel when every tensor allows
        it (CPU or CUDA, floating point), else foreach; as chosen by the user."""
        foreach, fused = group["foreach"], group["fused"]
        if foreach is None and fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES
                        and type(p) in (Tensor, torch.nn.Parameter) for p in params)
            foreach = not fused
        return bool(foreach), bool(fused)

    def _priorities(self, work: list[GroupTensors], groups: list[dict]) -> list[float | None]:
        """Step 5: p_t = ‖g_t‖₂ over each group, gathered with one host sync.

        Under FSDP2 every rank holds a shard of each gradient: the squared
        norms of the shards are summed over the ranks with one all-reduce per
        step for all groups, so that every rank takes the same decisions."""
        present = [w for w in work if w.params]
        if not present:
            return [None] * len(work)
        device = present[0].grads[0].device
        sq = [_kernels.squared_norms(w.grads).to(device, torch.float64) for w in present]
        flat = _kernels.reduce_shards(torch.cat(sq), [g for w in present for g in w.shard_groups])
        sq = flat.split([len(w.grads) for w in present])
        values = [s.sqrt().sum() if g.get("reference_compat") else s.sum().sqrt()
                  for s, g in zip(sq, (g for w, g in zip(work, groups) if w.params))]
        values = iter(torch.stack(values).tolist())
        return [next(values) if w.params else None for w in work]

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
        priorities = self._priorities(work, self.param_groups)
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
            if w.params:
                self._step_group(group, w, p_t)
        return loss

    def _step_group(self, group: dict, w: GroupTensors, p_t: float) -> None:
        capacity = group["buffer_size"]
        priority = list(w.priority)
        slot, occupied = w.slot, w.occupied = choose_slot(priority, p_t, capacity)
        foreach, fused = self._implementation(group, w.params)
        entries = self._update(group, w, foreach, fused)
        if not capacity:
            return
        if len(priority) >= capacity:
            self._counts["full"] += 1
            self._counts["replaced"] += slot is not None
        if slot is not None:
            members, entries = w.members, entries
            if w.inserted:  # the update wrote the rows of the parameters it stepped; the others remain
                stepped = {id(st) for st in w.states}
                rest = [(st, e) for st, e in zip(w.members, entries) if id(st) not in stepped]
                members, entries = [st for st, _ in rest], [e for _, e in rest]
            if members:
                insert_entry(members, entries, slot, occupied, foreach or fused)
            if occupied:
                priority[slot] = p_t
            else:
                priority.append(p_t)
        decay = group["decay"]  # step 7: priorities fade by lambda every step
        priority = [q * decay for q in priority]
        for st in w.members:
            st["priority"] = priority

    def _update_arguments(self, group: dict, w: GroupTensors, foreach: bool, fused: bool) -> dict:
        """The arguments that the functional updates (:func:`~cl_cm.adam_cm`,
        :func:`~cl_cm.adam_cg`) take, from the group's tensors: the buffer
        enters through buffer_weight = κ/|B| and buffer_sums = ΣB."""
        n = len(w.priority)
        weight = group["kappa"] / n if n else 0.0
        beta1, beta2 = group["betas"]
        return dict(params=w.params, grads=w.grads, exp_avgs=[st["exp_avg"] for st in w.states],
                    exp_avg_sqs=[st["exp_avg_sq"] for st in w.states],
                    buffer_sums=[st["buffer_sum"] for st in w.states] if weight else [],
                    state_steps=[st["step"] for st in w.states], buffer_weight=weight, lr=group["lr"],
                    beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    foreach=foreach, fused=fused,
                    workspace=self._workspace.like(w.params) if weight and not group.get("compiled") else None)

    def _update(self, group: dict, w: GroupTensors, foreach: bool, fused: bool) -> list[Tensor | None]:
        """Apply the update rule to ``w.params`` and return the entries to offer
        the buffer, aligned with ``w.members``."""
        raise NotImplementedError

    # --------------------------------------------------------- checkpointing
    def __getstate__(self) -> dict:
        # pickling (copy.deepcopy, Avalanche's checkpoints) keeps the counters;
        # the scratch workspace is rebuilt
        return {**super().__getstate__(), "skipped_steps": self.skipped_steps, "_counts": dict(self._counts)}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("skipped_steps", 0)
        state.setdefault("_counts", {"full": 0, "replaced": 0})
        super().__setstate__(state)
        self._workspace = _kernels.Workspace()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, buffers included.

        torch casts every floating-point state tensor to the parameter's dtype
        and device; this puts ``buffer`` back in ``buffer_dtype`` and ``step``
        on the CPU, where the host reads it without a device sync.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st:
                    st["step"] = st["step"].to("cpu", torch.float32)
                if "buffer" in st and group["buffer_dtype"] is not None:
                    st["buffer"] = st["buffer"].to(group["buffer_dtype"])

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
            n = len(priority)
            scaled = [q * factor for q in priority]
            for st in states:
                if n and "buffer" in st:
                    st["buffer"][:n].mul_(factor)
                    st["buffer_sum"] = _row_sum(st["buffer"], n, st["exp_avg"].dtype)
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
            self._fit_buffer(group, int(n), self._group_states(group))

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
                    part[2:] = _gram(st["buffer"][:n]).reshape(-1)
                parts.append(part)
                shards += [_kernels.local_view(p)[1]] * part.numel()
            layout.append((priority, len(members)))
        totals = iter(_kernels.reduce_shards(torch.cat(parts), shards).cpu().split(
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
        """Bytes held by the stored entries (the ``buffer`` tensors)."""
        return sum(st["buffer"].numel() * st["buffer"].element_size()
                   for st in self.state.values() if "buffer" in st)


def _capacity(state: dict) -> int:
    buf = state.get("buffer")
    return 0 if buf is None else buf.shape[0]


def _row_sum(buffer: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    if n == 0:
        return torch.zeros(buffer.shape[1:], dtype=dtype, device=buffer.device)
    return buffer[:n].sum(dim=0, dtype=dtype)


def _gram(rows: Tensor) -> Tensor:
    flat = rows.reshape(rows.shape[0], -1).double()
    return flat @ flat.T
