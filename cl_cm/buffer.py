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


def _as_blocks(flat: Tensor, blocks: int) -> Tensor:
    """``flat`` as ``(blocks, BLOCK)``: a view when it fills whole blocks, else padded with zeros."""
    if flat.numel() == blocks * BLOCK:
        return flat.view(blocks, BLOCK)
    return torch.nn.functional.pad(flat, (0, blocks * BLOCK - flat.numel())).view(blocks, BLOCK)


def stored(row: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The value that a ``row`` (or rows, with the leading dimension of
    ``scale``) holds, in ``dtype``: the row itself, or its dequantised codes
    (code × its block's scale)."""
    if scale is None:
        return row if row.dtype == dtype else row.to(dtype)
    lead, blocks = scale.shape[:-1], scale.shape[-1]
    numel = math.prod(row.shape[len(lead):])
    if not lead:  # one row
        values = _as_blocks(row.reshape(-1).to(dtype), blocks) * scale.to(dtype).unsqueeze(1)
        return values.view(-1)[:numel].view(row.shape)
    codes = row.reshape(-1, numel).to(dtype)
    values = torch.stack([_as_blocks(c, blocks) for c in codes]) * scale.to(dtype).reshape(-1, blocks, 1)
    return values.reshape(len(codes), -1)[:, :numel].reshape(row.shape)


def quantized(entry: Tensor, blocks: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scales, values) of ``entry`` in the 8-bit buffer: per block of
    :data:`BLOCK` elements, scale = max|x| / 127 (float32) and code =
    round(x / scale) in [−127, 127] (absmax quantisation: the largest element
    of a block is exact, the others err by at most max|x| / 254); ``values``
    = code × scale in ``dtype``, exactly what :func:`stored` reads back. Codes
    and values are flat."""
    numel = entry.numel()
    x = _as_blocks(entry.reshape(-1).float(), blocks)
    scale = x.abs().amax(dim=1) / 127.0
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (x * inverse.unsqueeze(1)).round().clamp(-127, 127)
    values = (q.to(dtype) * scale.to(dtype).unsqueeze(1)).view(-1)[:numel]
    return q.view(-1)[:numel].to(INT8), scale, values


# ------------------------------------------------------------ writing
def write_row_(total: Tensor, row: Tensor, entry: Tensor | None, replace: bool | Tensor,
               scale: Tensor | None = None, write: Tensor | None = None) -> None:
    """Step 6 of Alg. 1 for one tensor: store ``entry`` in ``row`` and keep
    ``total`` (ΣB) equal to the sum of the stored rows,

        ΣB ← ΣB − [replace]·old row + new row,

    both rows as stored: rounded to the buffer's dtype, or dequantised for the
    8-bit buffer (``scale`` given: the row's block scales). ``entry=None``
    stores zeros (a parameter without a gradient at that step).

    Inside :func:`torch.compile`, ``write`` and ``replace`` are 0-dim tensors
    (1 or 0) and the same formula runs without a branch: ``write=0`` keeps
    the old row (with ``replace=1``, so that ΣB gains old − old = 0).
    """
    if write is not None:
        if scale is None:
            new = torch.where(write > 0, entry.to(row.dtype), row)
            total.add_(new.to(total.dtype) - replace * row.to(total.dtype))
            row.copy_(new)
        else:
            codes, s, _ = quantized(entry, scale.numel())
            codes = torch.where(write > 0, codes, row.reshape(-1))
            s = torch.where(write > 0, s, scale)
            new = stored(codes.view(row.shape), s, total.dtype)
            total.add_(new - replace * stored(row, scale, total.dtype))
            row.copy_(codes.view(row.shape))
            scale.copy_(s)
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
        total.add_(row)
    else:
        codes, s, values = quantized(entry, scale.numel(), total.dtype)
        row.view(-1).copy_(codes)
        scale.copy_(s)
        total.add_(values.view(total.shape))


def slot_rows(buffers: list[Tensor] | None, buffer_scales: list[Tensor] | None, slot: int | None
              ) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """(rows, their block scales) of row ``slot`` of every tensor's buffer; None
    where nothing is stored at this step (or the buffer is not 8-bit, for scales)."""
    rows = None if buffers is None or slot is None else [b[slot] for b in buffers]
    scales = None if buffer_scales is None or slot is None else [s[slot] for s in buffer_scales]
    return rows, scales


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
