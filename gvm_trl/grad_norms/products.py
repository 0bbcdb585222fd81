"""Per-sample gradients held as factors or dense tensors, their squared norms and inner products, per row.

A 2-D parameter's per-sample gradient Σ_t l_t r_tᵀ is kept as its factors (:class:`_Outer`) and reduced with
either the Gram ("ghost norm") identity or by materialising it, whichever :func:`_choose_method` finds cheaper.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Method = Literal["auto", "ghost", "materialize"]

# Largest intermediate (Gram or materialised gradient) built at once, in elements; work is split over rows above it.
_CHUNK_ELEMENTS = 1 << 26
# Cost of forming and reducing one element of a materialised per-sample gradient, in multiply-adds (CPU-calibrated).
_MATERIALIZE_OVERHEAD = 256
# Ghost norms of long sequences multiply Grams out in blocks of this many positions, skipping the mirrored half.
_GRAM_BLOCK = 128


def _choose_method(t_a: int, t_b: int, m: int, n: int) -> Literal["ghost", "materialize"]:
    """Ghost or materialised inner product of per-sample gradients (m×n) summed over T_a and T_b positions.

    Ghost costs T_a·T_b·(m + n) multiply-adds; materialising costs T·m·n plus writing and reducing the m×n
    result, which is memory-bound: counted as ``_MATERIALIZE_OVERHEAD`` multiply-adds per element. This agrees
    with the "ghost when 2T² ≤ m·n" rule on every CPU measurement of the design notes (ghost everywhere at T=128;
    q/k/v and MLP materialised at T≈400, lm_head a tie there) and, unlike it, materialises a 49k×256 lm_head at
    T=1024, where that is 3× faster.
    """
    ghost = t_a * t_b * (m + n)
    materialize = (max(t_a, t_b) + _MATERIALIZE_OVERHEAD) * m * n
    return "ghost" if ghost <= materialize else "materialize"





@dataclass
class _Outer:
    """Per-sample gradient Σ_t left_t right_tᵀ of a 2-D parameter of shape [m, n].

    ``left`` is [B, T, m], or [B, T] token ids standing for one-hot rows (embeddings); ``right`` is [B, T, n].
    Positions outside ``valid`` are ignored (masked with ``where``: padding may hold NaN). ``left_key``/``right_key``
    name a side shared between layers (:meth:`_SharedInputs.capture`), whose Gram is then computed once.
    """

    left: Tensor
    right: Tensor
    m: int
    valid: Tensor | None
    left_key: Hashable | None = None
    right_key: Hashable | None = None

    @property
    def ids(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def n(self) -> int:
        return self.right.shape[-1]

    @property
    def length(self) -> int:
        return self.right.shape[1]


@dataclass
class _Dense:
    """Materialised per-sample gradient [B, *param.shape] (biases and norm weights: small)."""

    value: Tensor


@dataclass
class _Squares:
    """Per-row squared norms [B] (float64) of a parameter with one use, reduced as soon as it was formed."""

    value: Tensor


@dataclass
class _Summed:
    """Per-sample gradient Σ_t Π_k factors[k][b, t] of a 1-D parameter, factors [B, T, n] each: a bias (one factor,
    the output gradient) or a channel-wise parameter (its sensitivity u and the output gradient). Kept unreduced
    so that the layers of a model reduce together in a few batched kernels (:func:`batched_self_squares`)."""

    factors: tuple[Tensor, ...]
    valid: Tensor | None

    def dense(self) -> _Dense:
        dtype = _compute_dtype(self.factors[-1])
        product = _masked(self.factors[0], self.valid, dtype)
        for factor in self.factors[1:]:
            product = product * _masked(factor, self.valid, dtype)
        return _Dense(product.sum(1))


_Record = _Outer | _Dense | _Squares | _Summed


def record_device(rec: _Record) -> torch.device:
    """Where a record's factors are (its module's device)."""
    if isinstance(rec, _Outer):
        return rec.right.device
    return (rec.factors[-1] if isinstance(rec, _Summed) else rec.value).device


def on_device(rec: _Record, device: torch.device) -> _Record:
    """``rec`` with its tensors on ``device`` (itself where they are there already)."""
    if record_device(rec) == device:
        return rec
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    if isinstance(rec, _Outer):
        return _Outer(move(rec.left), move(rec.right), rec.m, move(rec.valid))
    if isinstance(rec, _Summed):
        return _Summed(tuple(map(move, rec.factors)), move(rec.valid))
    return type(rec)(move(rec.value))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked(x: Tensor, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    return x if valid is None else torch.where(valid[..., None], x, 0)


def _row_chunks(batch: int, elements_per_row: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(elements_per_row, 1))
    return [slice(i, i + step) for i in range(0, batch, step)]


def _factor_elements(rec: _Outer) -> int:
    """Elements per row of the (cast, masked) copies of both factors."""
    return rec.length * ((1 if rec.ids else rec.m) + rec.n)


def _sum_rows(x: Tensor) -> Tensor:
    """Per-row sum of a [b, ...] tensor: in its dtype along the last dim, then in float64."""
    if x.ndim > 2:
        x = x.sum(-1)
    return x.flatten(1).sum(1, dtype=torch.float64)


def _materialize(rec: _Outer, rows: slice, dtype: torch.dtype) -> Tensor:
    """[b, m, n] per-sample gradients of ``rows`` (dense ``left`` only)."""
    valid = _valid(rec, rows)
    return _masked(rec.left[rows], valid, dtype).mT @ _masked(rec.right[rows], valid, dtype)


def _valid(rec: _Outer, rows: slice) -> Tensor | None:
    return None if rec.valid is None else rec.valid[rows]


@dataclass
class _Shared:
    source: Tensor
    detached: Tensor
    gram: Tensor | None = None
    pending: int = 0


class _SharedInputs:
    """Activations captured by the hooks, deduplicated: layers reading one input (q/k/v, gate/up) share it and its
    Gram a·aᵀ. An entry lives while a record still needs it.

    Keyed on the memory the input reads (address, shape, strides, dtype, device, version), not on the tensor
    object: models may hand each layer its own view of one tensor, and a record's factors are fresh views anyway.
    Holding the source keeps the address from being reused while the entry lives; the version counter keeps an
    input modified in place between two reads from being shared."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Shared] = {}

    def capture(self, source: Tensor) -> tuple[Hashable, Tensor]:
        key = _memory_key(source)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Shared(source, source.detach())
        entry.pending += 1
        return key, entry.detached

    def release(self, key: Hashable | None) -> None:
        entry = self._entries.get(key) if key is not None else None
        if entry is not None:
            entry.pending -= 1
            if entry.pending <= 0:
                del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def gram(self, x: Tensor, key: Hashable | None, valid: Tensor | None, rows: slice, dtype: torch.dtype) -> _Gram:
        """Gram of ``x`` [B, T, k] restricted to ``rows``; whole and cached for shared inputs if the batch fits."""
        batch, length, width = x.shape
        entry = self._entries.get(key) if key is not None else None
        if entry is None or batch * length * (length + width) > _CHUNK_ELEMENTS:
            return _Gram(factor=_masked(x[rows], None if valid is None else valid[rows], dtype))
        if entry.gram is None:
            factor = _masked(x, valid, dtype)
            entry.gram = factor @ factor.mT
        return _Gram(whole=entry.gram[rows])


def _memory_key(x: Tensor) -> Hashable:
    try:
        address = x.data_ptr()
    except RuntimeError:  # no storage (a wrapper subclass): the object itself
        return id(x)
    return address, x.shape, x.stride(), x.dtype, x.device, x._version


@dataclass
class _Gram:
    """A Gram x·xᵀ, held whole or as its factor x whose blocks are multiplied out on demand."""

    whole: Tensor | None = None
    factor: Tensor | None = None

    def block(self, i: slice, j: slice) -> Tensor:
        if self.whole is not None:
            return self.whole[:, i, j]
        return self.factor[:, i] @ self.factor[:, j].mT


def _gram_dot(a: _Gram, b: _Gram, length: int) -> Tensor:
    """Σ_{t,s} A_ts·B_ts of two symmetric Grams, over the upper block triangle only (≈ half the products)."""
    blocks = [slice(i, i + _GRAM_BLOCK) for i in range(0, length, _GRAM_BLOCK)]
    total = 0
    for k, i in enumerate(blocks):
        for j in blocks[k:]:
            total = total + (1 if i == j else 2) * _sum_rows(a.block(i, j) * b.block(i, j))
    return total


def _self_square(rec: _Record, method: Method, cache: _SharedInputs) -> Tensor:
    """‖G_b‖² for every row b, float64."""
    if isinstance(rec, _Squares):
        return rec.value
    if isinstance(rec, _Summed):
        rec = rec.dense()
    if isinstance(rec, _Dense):
        return _sum_rows(rec.value.to(torch.float64).square())
    if rec.ids:
        return _ids_ghost_square(rec) if method == "ghost" else _ids_segment_square(rec)
    dtype, batch, length = _compute_dtype(rec.right), rec.right.shape[0], rec.length
    if method == "auto":
        method = _choose_method(length, length, rec.m, rec.n)
    if method == "materialize":
        rows = _row_chunks(batch, rec.m * rec.n + _factor_elements(rec))
        return torch.cat([_sum_rows(_materialize(rec, r, dtype).square()) for r in rows])
    parts = []
    for r in _row_chunks(batch, length * length + _factor_elements(rec)):
        left = cache.gram(rec.left, rec.left_key, rec.valid, r, dtype)
        right = cache.gram(rec.right, rec.right_key, rec.valid, r, dtype)
        parts.append(_gram_dot(left, right, length))
    return torch.cat(parts)


def _ids_ghost_square(rec: _Outer) -> Tensor:
    """Σ_{t,s} [id_t = id_s] (g_t·g_s)."""
    dtype, batch, length = _compute_dtype(rec.right), rec.right.shape[0], rec.length
    parts = []
    for r in _row_chunks(batch, length * length + _factor_elements(rec)):
        g = _masked(rec.right[r], _valid(rec, r), dtype)
        same = rec.left[r, :, None] == rec.left[r, None, :]
        parts.append(_sum_rows(torch.where(same, g @ g.mT, 0)))
    return torch.cat(parts)


def _ids_segment_square(rec: _Outer) -> Tensor:
    """Sum g_t over equal (row, id) pairs, square, and add up per row: O(T·d).

    Equal pairs are found by sorting, not ``torch.unique``, whose output size depends on the data (a host sync):
    segment k of the sorted keys goes to slot k of a buffer with room for every position, the unused slots stay 0.
    """
    batch, length, n = rec.right.shape
    g = _masked(rec.right, rec.valid, _compute_dtype(rec.right)).reshape(-1, n)
    rows = torch.arange(batch, device=g.device)[:, None].expand(batch, length).reshape(-1)
    keys, order = torch.sort(rows * rec.m + rec.left.reshape(-1))
    starts = torch.ones_like(keys, dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    segment = starts.cumsum(0) - 1
    sums = torch.zeros_like(g).index_add_(0, segment, g[order])
    squares = sums.to(torch.float64).square().sum(1)
    segment_rows = torch.zeros_like(keys).scatter_(0, segment, keys // rec.m)
    return torch.zeros(batch, dtype=torch.float64, device=g.device).index_add_(0, segment_rows, squares)


def _cross(a: _Record, b: _Record, method: Method) -> Tensor:
    """⟨G_a, G_b⟩ per row (two uses of one parameter), float64."""
    if isinstance(a, _Squares) or isinstance(b, _Squares):
        raise AssertionError("squared norms are kept only for parameters with a single use")
    a, b = (rec.dense() if isinstance(rec, _Summed) else rec for rec in (a, b))
    if isinstance(a, _Dense) and isinstance(b, _Dense):
        return _sum_rows(a.value.to(torch.float64) * b.value.to(torch.float64))
    if isinstance(a, _Dense) or isinstance(b, _Dense):
        dense, outer = (a, b) if isinstance(a, _Dense) else (b, a)
        return _dense_outer_dot(dense.value, outer)
    if a.ids and b.ids:
        return _ids_ids_dot(a, b)
    if b.ids:
        a, b = b, a
    if method == "auto":
        method = _choose_method(a.length, b.length, b.m, b.n)
    if method == "materialize" or a.ids:
        return _materialized_dot(a, b) if method == "materialize" else _ids_ghost_dot(a, b)
    return _ghost_dot(a, b)


def _pair_chunks(a: _Outer, b: _Outer) -> list[slice]:
    return _row_chunks(a.right.shape[0], a.length * b.length + _factor_elements(a) + _factor_elements(b))


def _ghost_dot(a: _Outer, b: _Outer) -> Tensor:
    """Σ_{t,s} (l_t·l'_s)(r_t·r'_s)."""
    dtype, parts = _compute_dtype(a.right), []
    for r in _pair_chunks(a, b):
        la, lb = _masked(a.left[r], _valid(a, r), dtype), _masked(b.left[r], _valid(b, r), dtype)
        ra, rb = _masked(a.right[r], _valid(a, r), dtype), _masked(b.right[r], _valid(b, r), dtype)
        parts.append(_sum_rows((la @ lb.mT) * (ra @ rb.mT)))
    return torch.cat(parts)


def _ids_ghost_dot(ids: _Outer, b: _Outer) -> Tensor:
    """Σ_{t,s} l'_s[id_t] (r_t·r'_s): embedding rows against a dense left side (tied head)."""
    dtype, parts = _compute_dtype(ids.right), []
    for r in _pair_chunks(ids, b):
        lb = _masked(b.left[r], _valid(b, r), dtype)
        index = ids.left[r, None, :].expand(-1, b.length, -1)
        ra, rb = _masked(ids.right[r], _valid(ids, r), dtype), _masked(b.right[r], _valid(b, r), dtype)
        parts.append(_sum_rows(lb.gather(2, index) * (rb @ ra.mT)))
    return torch.cat(parts)


def _ids_ids_dot(a: _Outer, b: _Outer) -> Tensor:
    dtype, parts = _compute_dtype(a.right), []
    for r in _pair_chunks(a, b):
        ra, rb = _masked(a.right[r], _valid(a, r), dtype), _masked(b.right[r], _valid(b, r), dtype)
        same = a.left[r, :, None] == b.left[r, None, :]
        parts.append(_sum_rows(torch.where(same, ra @ rb.mT, 0)))
    return torch.cat(parts)


def _materialized_dot(a: _Outer, b: _Outer) -> Tensor:
    """⟨G_a, G_b⟩ with ``b`` materialised (``a`` may be token ids)."""
    dtype, parts = _compute_dtype(b.right), []
    for r in _row_chunks(b.right.shape[0], b.m * b.n + _factor_elements(a) + _factor_elements(b)):
        parts.append(_dense_outer_dot(_materialize(b, r, dtype), _slice(a, r)))
    return torch.cat(parts)


def _slice(rec: _Outer, rows: slice) -> _Outer:
    return _Outer(rec.left[rows], rec.right[rows], rec.m, _valid(rec, rows))


def _dense_outer_dot(dense: Tensor, rec: _Outer) -> Tensor:
    """Σ_t l_tᵀ D r_t per row, D: [B, m, n]."""
    dtype = _compute_dtype(dense)
    right = _masked(rec.right, rec.valid, dtype)
    if rec.ids:
        rows = dense.to(dtype).gather(1, rec.left[..., None].expand(-1, -1, rec.n))
        return _sum_rows(rows * right)
    return _sum_rows(_masked(rec.left, rec.valid, dtype) * (right @ dense.to(dtype).mT))


# --------------------------------------------------------------------------------------------------------------
# Many layers at once

# Largest stacked intermediate of :func:`batched_self_squares` (factors and Grams of a group of layers), in elements.
_BATCHED_ELEMENTS = 1 << 27
# Gram products of bf16/fp16 factors on these devices: multiplied in that precision with fp32 accumulation and output
# (cuBLAS ``out_dtype``), instead of casting the factors to fp32 first. Error against float64: README.
LOW_PRECISION_GRAMS = True
LOW_PRECISION_DEVICES = ("cuda",)
# The kernel, called as (x, xᵀ, out_dtype=torch.float32); a module attribute so that its use can be tested anywhere.
low_precision_bmm = torch.bmm
_LOW_PRECISION_SUPPORT: dict[tuple, bool] = {}


def _gram(x: Tensor) -> Tensor:
    """x·xᵀ over the last two dims, float32 (float64 for float64 x); low-precision factors multiply in their own
    precision with fp32 accumulation where the kernel offers it (``LOW_PRECISION_GRAMS``)."""
    if LOW_PRECISION_GRAMS and x.dtype in (torch.bfloat16, torch.float16) and _low_precision_supported(x):
        return low_precision_bmm(x, x.mT, out_dtype=torch.float32)
    x = x.to(_compute_dtype(x))
    return x @ x.mT


def _low_precision_supported(x: Tensor) -> bool:
    """Whether :data:`low_precision_bmm` takes ``out_dtype`` for ``x``'s device and dtype, tried once on a 1×1×1
    input. Deciding on a probe keeps the real call out of any ``except``: an out-of-memory error there (a
    ``RuntimeError``) must surface, not be retried with fp32 copies twice the size."""
    if x.device.type not in LOW_PRECISION_DEVICES:
        return False
    key = (x.device.type, x.dtype, low_precision_bmm)
    if key not in _LOW_PRECISION_SUPPORT:
        probe = torch.ones(1, 1, 1, dtype=x.dtype, device=x.device)
        try:
            supported = low_precision_bmm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # no out_dtype argument, or no kernel for it (NotImplementedError)
            supported = False
        _LOW_PRECISION_SUPPORT[key] = supported
    return _LOW_PRECISION_SUPPORT[key]


def _stacked(tensors: list[Tensor], invalid: Tensor | None) -> Tensor:
    """[L, B, T, n] with positions outside ``valid`` zeroed (``where``/``masked_fill``: padding may hold NaN)."""
    if len(tensors) == 1:
        x = tensors[0][None]
        return x if invalid is None else torch.where(invalid[None, ..., None], 0, x)
    x = torch.stack(tensors)
    return x if invalid is None else x.masked_fill_(invalid[None, ..., None], 0)


def _masked_gram(stacked: Tensor, unpaired: Tensor | None) -> Tensor:
    """Grams [L·B, T, T] of stacked factors [L, B, T, n], zero where a position is padding."""
    return _mask_pairs(_gram(stacked.flatten(0, 1)), unpaired, stacked.shape[0])


def _mask_pairs(gram: Tensor, unpaired: Tensor | None, layers: int) -> Tensor:
    if unpaired is None:
        return gram
    return gram.unflatten(0, (layers, -1)).masked_fill_(unpaired, 0).flatten(0, 1)


def _ghost_side(rec: _Outer) -> tuple[Hashable, Tensor, Tensor]:
    """(key, shared side, own side) of a weight's factors: the side read from a possibly shared input (keyed by
    :class:`_SharedInputs`, so every layer reading one input gets one key), and the output gradient."""
    if rec.left_key is not None:
        return rec.left_key, rec.left, rec.right
    if rec.right_key is not None:
        return rec.right_key, rec.right, rec.left
    return id(rec.right), rec.right, rec.left


def batchable(rec: _Record, method: Method) -> bool:
    """Whether :func:`batched_self_squares` reduces this single-use record (else :func:`_self_square` does)."""
    if isinstance(rec, _Summed):
        return True
    if not isinstance(rec, _Outer) or rec.ids or rec.left.ndim != 3:
        return False
    if rec.left.shape[0] * rec.length * (rec.m + rec.n) > _BATCHED_ELEMENTS:
        return False  # e.g. an untied head's [B, L, V] gradient: reduced by rows, never cast to fp32 whole
    chosen = _choose_method(rec.length, rec.length, rec.m, rec.n) if method == "auto" else method
    return chosen == "ghost"


def batched_self_squares(records: list[_Record], batch: int, device: torch.device) -> Tensor:
    """Σ over ``records`` (single-use, :func:`batchable`) of ‖G_b‖², float64 [B], in a few batched kernels.

    Weights reading one input (q/k/v, gate/up) share its Gram: Σ_k ‖Σ_t g^k_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)
    (Σ_k g^k_t·g^k_s), the Gram of their output gradients concatenated. Layers of equal shapes (on one device) are
    stacked, so each group of them costs one Gram product per factor, one product and one sum; 1-D parameters
    (biases, norm weights) are stacked likewise and reduced as Σ_t Π_k factors. Groups are split where the stacked
    tensors would exceed ``_BATCHED_ELEMENTS``. Each group is reduced on its own device (a model split by
    ``device_map``) and only its [B] sums move to ``device``.
    """
    total = torch.zeros(batch, dtype=torch.float64, device=device)
    shared: dict[Hashable, tuple[Tensor, Tensor | None, list[Tensor]]] = {}  # by the shared side's key
    summed: dict[tuple, list[_Summed]] = {}
    for rec in records:
        if isinstance(rec, _Summed):
            signature = (tuple((f.shape, f.dtype) for f in rec.factors), rec.factors[0].device, id(rec.valid))
            summed.setdefault(signature, []).append(rec)
            continue
        key, side, own = _ghost_side(rec)
        shared.setdefault(key, (side, rec.valid, []))[2].append(own)
    groups: dict[tuple, list[tuple[Tensor, Tensor | None, list[Tensor]]]] = {}
    for side, valid, owns in shared.values():
        signature = (side.shape, side.dtype, side.device, tuple((o.shape, o.dtype) for o in owns), id(valid))
        groups.setdefault(signature, []).append((side, valid, owns))
    for members in groups.values():
        side, valid, owns = members[0]
        length = side.shape[1]
        per_layer = batch * (length * (side.shape[-1] + 2 * sum(o.shape[-1] for o in owns)) + 2 * length * length)
        # Entry (t, s) of a Gram reads rows t and s only: masking the [T, T] Grams (where padding may have left NaN)
        # instead of the wider factors touches less memory.
        unpaired = None if valid is None else ~(valid[:, :, None] & valid[:, None, :])
        step = max(1, _BATCHED_ELEMENTS // max(per_layer, 1))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            layers = len(chunk)
            gram_side = _masked_gram(_stacked([m[0] for m in chunk], None), unpaired)
            # Σ_k g^k_t·g^k_s is the Gram of the output gradients side by side: one product for all of them.
            owns_side_by_side = [_stacked([m[2][k] for m in chunk], None) for k in range(len(owns))]
            own = owns_side_by_side[0] if len(owns) == 1 else torch.cat(owns_side_by_side, -1)
            gram_own = _mask_pairs(_gram(own.flatten(0, 1)), unpaired, layers)
            products = (gram_side * gram_own).sum(-1).sum(-1, dtype=torch.float64)
            total += products.reshape(layers, batch).sum(0).to(device)
    for members in summed.values():
        valid = members[0].valid
        invalid = None if valid is None else ~valid
        per_layer = batch * sum(f[0].numel() if f.ndim > 1 else 1 for f in members[0].factors) * 2
        step = max(1, _BATCHED_ELEMENTS // max(per_layer, 1))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            dtype = _compute_dtype(chunk[0].factors[-1])
            product = None
            for k in range(len(chunk[0].factors)):
                factor = _stacked([m.factors[k] for m in chunk], invalid).to(dtype)
                product = factor if product is None else product * factor
            total += _sum_rows(product.sum(2).square().transpose(0, 1)).to(device)
    return total
