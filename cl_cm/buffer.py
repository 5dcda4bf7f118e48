"""The buffer of critical entries, as plain functions on an optimizer state.

Each parameter group keeps up to C = ``buffer_size`` entries. An entry is a
copy of one past step's momentum (Adam+CM, Malviya et al. 2024, Alg. 1) or
gradient (Adam+CG, McRae et al. 2022, Alg. 1), stored with a *priority*: the
L2 norm of that step's gradient over the whole group, multiplied by ``decay``
(λ) after every step so that old entries fade. A new entry fills a free slot,
or replaces the lowest-priority entry when its own priority is higher.

How the buffer lives in the state of each parameter (plain tensors, so that
``state_dict`` works and ``torch.load(weights_only=True)`` reads it):

* ``buffer``: a ``(C, *param.shape)`` tensor; rows ``0..n-1`` are the stored
  entries. Its dtype is the group's ``buffer_dtype`` (the parameter's by
  default) or, for the 8-bit buffer (``buffer_dtype=torch.int8``), int8 codes;
* ``buffer_scale`` (8-bit buffer only): ``(C, ceil(numel / 256))`` float32, one
  scale per block of :data:`BLOCK` consecutive elements of each row; the stored
  value of an element is its code times its block's scale;
* ``buffer_sum``: ΣB, the sum of the n stored rows *as stored* (rounded to the
  buffer's dtype, or dequantised), kept up to date at every write so that
  mean(B) costs one read per step instead of C;
* ``priority``: a list of n floats. Every parameter of a group holds the same
  list, so the row ``i`` of every parameter belongs to the same step: the
  buffer of a group is one buffer of whole-model entries, stored in slices.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: Elements per scale in the 8-bit buffer (block-wise absmax scaling).
BLOCK = 256
#: ``buffer_dtype`` of the 8-bit buffer: int8 codes, one float32 scale per block.
INT8 = torch.int8
#: ``buffer_dtype`` names accepted as strings (settings files, command lines).
DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64,
               "double": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "half": torch.float16, "int8": INT8, "8bit": INT8}


def as_buffer_dtype(value: Any) -> torch.dtype | None:
    """``buffer_dtype`` as a torch dtype, or None (the parameter's dtype).

    Accepts None, a floating torch dtype, ``torch.int8`` (the 8-bit buffer)
    and the names of :data:`DTYPE_NAMES` ("bfloat16", "int8", "8bit", ...).
    """
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in ("none", "param", "parameter"):
            return None
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    elif value is None or value == INT8 or (isinstance(value, torch.dtype) and value.is_floating_point
                                            and not value.itemsize == 1):
        return value
    raise ValueError(f"Invalid buffer_dtype: {value!r}. Use None (the parameter's dtype), a floating torch.dtype "
                     f"such as torch.bfloat16, torch.int8 for the 8-bit buffer, or one of the names "
                     f"{', '.join(DTYPE_NAMES)}.")


# ----------------------------------------------------------- which slot
def choose_slot(priority: list[float], new_priority: float, capacity: int) -> tuple[int | None, bool]:
    """Where a new entry goes (step 6 of Adam+CM's Alg. 1).

    Returns ``(slot, replace)``: the next free slot while |B| < C; otherwise the
    slot of the lowest priority if ``new_priority`` is strictly higher (the
    entry there is replaced), else ``(None, False)`` and the entry is dropped.
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


def record(priority: list[float], slot: int | None, new_priority: float, decay: float) -> list[float]:
    """The priorities after a step: the new entry's at its slot (step 6),
    then every priority multiplied by λ = ``decay`` (step 7)."""
    priority = list(priority)
    if slot is not None:
        if slot < len(priority):
            priority[slot] = new_priority
        else:
            priority.append(new_priority)
    return [q * decay for q in priority]


# ------------------------------------------------------------ storage
def allocate(like: Tensor, capacity: int, buffer_dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Empty storage for ``capacity`` entries shaped like ``like``: the
    ``buffer`` rows (and ``buffer_scale`` for the 8-bit buffer)."""
    dtype = buffer_dtype or like.dtype
    out = {"buffer": like.new_zeros((capacity, *like.shape), dtype=dtype)}
    if dtype == INT8:
        out["buffer_scale"] = like.new_zeros((capacity, _blocks(like.numel())), dtype=torch.float32)
    return out


def _blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def stored(row: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The value that a ``row`` (or rows, with the leading dimension of
    ``scale``) holds, in ``dtype``: the row itself, or its dequantised codes."""
    if scale is None:
        return row if row.dtype == dtype else row.to(dtype)
    lead = scale.shape[:-1]
    shape = row.shape[len(lead):]
    numel = math.prod(shape)
    codes = row.reshape(*lead, numel).to(dtype)
    padded = torch.nn.functional.pad(codes, (0, scale.shape[-1] * BLOCK - numel))
    values = padded.view(*lead, scale.shape[-1], BLOCK) * scale.to(dtype).unsqueeze(-1)
    return values.view(*lead, -1)[..., :numel].reshape(row.shape)


def quantize_(row: Tensor, scale: Tensor, entry: Tensor) -> None:
    """Store ``entry`` in the int8 ``row`` and its block ``scale``: per block of
    :data:`BLOCK` elements, scale = max|x| / 127 and code = round(x / scale)
    (absmax quantisation, so that the largest element of a block is exact and
    the others err by at most half a step of max|x| / 127)."""
    numel = entry.numel()
    flat = entry.reshape(-1).float()
    padded = torch.nn.functional.pad(flat, (0, scale.numel() * BLOCK - numel)).view(-1, BLOCK)
    s = padded.abs().amax(dim=1) / 127.0
    inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = (padded * inverse.unsqueeze(1)).round_().clamp_(-127, 127)
    row.view(-1).copy_(codes.view(-1)[:numel])
    scale.copy_(s)


# ------------------------------------------------------------ writing
def write_row_(total: Tensor, row: Tensor, entry: Tensor | None, replace: bool | Tensor,
               scale: Tensor | None = None) -> None:
    """Step 6 of Alg. 1 for one tensor: store ``entry`` in ``row`` and keep
    ``total`` (ΣB) equal to the sum of the stored rows,

        ΣB ← ΣB − [replace]·old row + new row,

    both rows as stored: rounded to the buffer's dtype, or dequantised for the
    8-bit buffer (``scale`` given). ``entry=None`` stores zeros (a parameter
    without a gradient at that step).

    Inside :func:`torch.compile` ``replace`` is a 0-dim tensor (1 or 0) and the
    same formula runs without a branch; there, writing the old row back with
    ``replace=1`` leaves row and ΣB exactly as they were (ΣB + (old − old)).
    """
    if isinstance(replace, Tensor):
        new = entry.to(row.dtype)
        total.add_(new.to(total.dtype) - replace * row.to(total.dtype))
        row.copy_(new)
        return
    if replace:
        total.sub_(stored(row, scale, total.dtype))
    if entry is None:
        row.zero_()
        if scale is not None:
            scale.zero_()
        return
    if scale is None:
        row.copy_(entry)
    else:
        quantize_(row, scale, entry)
    total.add_(stored(row, scale, total.dtype))


def write_rows_(totals: list[Tensor], rows: list[Tensor], entries: list[Tensor | None], replace: bool,
                scales: list[Tensor] | None = None) -> None:
    """:func:`write_row_` for each tensor of a list."""
    for i, (total, row, entry) in enumerate(zip(totals, rows, entries)):
        write_row_(total, row, entry, replace, None if scales is None else scales[i])


def write_entries(states: list[dict], entries: list[Tensor | None], slot: int, replace: bool) -> None:
    """:func:`write_row_` for each state: row ``slot`` of its buffer."""
    for st, entry in zip(states, entries):
        scale = st.get("buffer_scale")
        write_row_(st["buffer_sum"], st["buffer"][slot], entry, replace,
                   None if scale is None else scale[slot])


# ------------------------------------------------------ reading, refitting
def capacity(state: dict) -> int:
    buf = state.get("buffer")
    return 0 if buf is None else buf.shape[0]


def rows(state: dict, n: int, dtype: torch.dtype) -> Tensor:
    """The first ``n`` stored entries of a state as one ``(n, *shape)`` tensor in ``dtype``."""
    scale = state.get("buffer_scale")
    return stored(state["buffer"][:n], None if scale is None else scale[:n], dtype)


def row_sum(state: dict, n: int, dtype: torch.dtype) -> Tensor:
    """ΣB of the first ``n`` rows, summed afresh in ``dtype``."""
    like = state["buffer"]
    if n == 0:
        return torch.zeros(like.shape[1:], dtype=dtype, device=like.device)
    return rows(state, n, dtype).sum(dim=0, dtype=dtype)


def scale_rows_(state: dict, n: int, factor: float) -> None:
    """Multiply the first ``n`` stored entries by ``factor`` (exactly, for the
    8-bit buffer: its scales are multiplied) and sum ΣB afresh."""
    scale = state.get("buffer_scale")
    if scale is None:
        state["buffer"][:n].mul_(factor)
    else:
        scale[:n].mul_(factor)
    state["buffer_sum"] = row_sum(state, n, state["buffer_sum"].dtype)


def fit(states: list[dict], capacity: int, buffer_dtype: torch.dtype | None) -> None:
    """Give every state ``capacity`` rows in ``buffer_dtype``, keeping the
    highest-priority entries (in their order), and free the buffer when
    ``capacity`` is 0."""
    if not states:
        return
    priority = states[0]["priority"]
    ranked = sorted(range(len(priority)), key=lambda i: -priority[i])
    keep = sorted(ranked[:capacity])
    for st in states:
        if capacity == 0:
            for key in ("buffer", "buffer_scale", "buffer_sum"):
                st.pop(key, None)
            st["priority"] = []
            continue
        like = st["exp_avg"]
        new = allocate(like, capacity, buffer_dtype)
        if keep and "buffer" in st:
            if st["buffer"].dtype == new["buffer"].dtype:  # the stored rows move as they are
                for key, tensor in new.items():
                    tensor[: len(keep)] = st[key][keep]
            else:  # the buffer's dtype changed: store the kept values anew
                values = rows(st, len(priority), torch.float32)[keep]
                scratch = torch.zeros_like(values[0])
                for i, value in enumerate(values):
                    write_row_(scratch, new["buffer"][i], value, False,
                               new["buffer_scale"][i] if "buffer_scale" in new else None)
        st.pop("buffer_scale", None)
        st.update(new)
        st["buffer_sum"] = row_sum(st, len(keep), like.dtype)
        st["priority"] = [priority[i] for i in keep]


def gram(rows_: Tensor) -> Tensor:
    """Gram matrix of ``(n, ...)`` rows in float64: their pairwise dot products."""
    flat = rows_.reshape(rows_.shape[0], -1).double()
    return flat @ flat.T
