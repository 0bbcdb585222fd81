"""How many rows of a batch one micro-batch of the gradient-norm pass can measure in a given amount of free memory.

What a micro-batch keeps is measured, not derived from layer formulas: a few probe passes of the pass itself on
synthetic rows (:class:`MemoryAccount` counts the bytes autograd saves in the forward, the bytes the hooks keep and
the head's logits gradient), fitted as ``fixed + rows · (a + b·T + c·T²)`` for a width of T tokens
(:class:`MemoryModel`). So every selection is covered as it runs: layers below the lowest measured parameter keep
nothing, the layers above keep their activations whether measured or not, the head keeps its [B, L, V] logits (or
their fp32 log-softmax) and its gradient, and the generic rule its inputs; autocast casts of fp32 weights, saved
once per micro-batch whatever its rows, are the fixed part.

Left out, and covered by the share of free memory left unused (``1 - MEMORY_SHARE``): transients that live for a
moment (the head's fp32 temporaries while its gradient forms, the norm products' chunks of at most
``products._BATCHED_ELEMENTS``/``_CHUNK_ELEMENTS`` elements, the generic rule's replays of at most
``rules._REPLAY_ELEMENTS``), and the caching allocator's fragmentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn

# Share of the free accelerator memory the estimate may fill; the rest is for what it leaves out (module docstring).
MEMORY_SHARE = 0.6
# Widths of the probe passes (one row each, and two rows at the widest): three points fit the quadratic in T; a
# model with fewer positions is probed at 1/4, 1/2 and all of them.
PROBE_WIDTHS = (64, 128, 256)


class MemoryAccount:
    """The bytes one micro-batch keeps: every storage autograd saves during the forward (``saved_tensors_hooks``),
    every storage the hooks keep (captured inputs, output gradients, records) and the gradient of the model's
    logits, each once; the model's parameters and buffers (resident anyway) left out.

    The union over the whole micro-batch bounds the peak of what is saved and kept at any moment. Hand-written:
    a CPU has no allocator statistics, and a GPU's peak statistics are per process (resetting them would disturb
    the caller) and cannot tell one micro-batch's memory from the rest."""

    def __init__(self, model: nn.Module) -> None:
        self.resident = {_storage_key(t)[0] for t in chain(model.parameters(), model.buffers())}
        # Referenced, so that no address or id is reused while the account lives.
        self.storages: dict[Hashable, tuple[int, Tensor]] = {}
        self._walked: dict[int, object] = {}

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.storages.values())

    def saving(self) -> contextlib.AbstractContextManager:
        """Counts what autograd saves while it is entered (the forward)."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: Tensor) -> Tensor:
        self.add(tensor)
        return tensor

    def keep_gradient(self, output: Tensor) -> None:
        """Counts the gradient ``output`` will receive (the logits': it exists whether the head is measured or not)."""
        if output.requires_grad:
            output.register_hook(self.add)

    def add(self, value) -> None:
        """Counts the storages of the tensors in ``value`` (nested lists, tuples, dicts and dataclasses)."""
        for tensor in _tensors(value, self._walked):
            key, size = _storage_key(tensor)
            if key not in self.resident and key not in self.storages:
                self.storages[key] = (size, tensor)


def _tensors(value, walked: dict[int, object]) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif id(value) in walked or isinstance(value, (str, bytes, nn.Module, type)):
        return
    elif isinstance(value, (list, tuple, dict)) or dataclasses.is_dataclass(value):
        walked[id(value)] = value
        if isinstance(value, dict):
            items = value.values()
        elif dataclasses.is_dataclass(value):
            items = [getattr(value, f.name) for f in dataclasses.fields(value)]
        else:
            items = value
        for item in items:
            yield from _tensors(item, walked)


def _storage_key(tensor: Tensor) -> tuple[Hashable, int]:
    try:
        storage = tensor.untyped_storage()
        return (tensor.device, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no storage (a wrapper subclass): the tensor itself
        return id(tensor), tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class MemoryModel:
    """Bytes a micro-batch of ``rows`` rows of ``width`` tokens keeps: ``fixed + rows · (a + b·width + c·width²)``,
    fitted on probe passes (:func:`memory_model`); ``probes`` maps (rows, width) to the bytes measured."""

    fixed: float
    per_row: tuple[float, float, float]
    probes: dict[tuple[int, int], int]

    def bytes(self, rows: int, width: int) -> int:
        a, b, c = self.per_row
        return math.ceil(self.fixed + rows * (a + b * width + c * width * width))

    def rows(self, budget: float, width: int) -> int:
        """Most rows whose micro-batch fits in ``budget`` bytes (0 where not even one does)."""
        a, b, c = self.per_row
        per_row = max(a + b * width + c * width * width, 1.0)
        return max(0, math.floor((budget - self.fixed) / per_row))

    @classmethod
    def fit(cls, probes: dict[tuple[int, int], int]) -> MemoryModel:
        """From one-row probes at three widths and a two-row probe at the widest; the curvature and slope are kept
        non-negative and the per-row part raised until every probe is bounded, so rounding noise in the probes
        cannot bend the estimate below what was measured."""
        t1, t2, t3 = widths = sorted(t for r, t in probes if r == 1)
        widest = t3
        f1, f2, f3 = (probes[1, t] for t in widths)
        per_row_widest = probes[2, widest] - f3
        c = max(0.0, ((f3 - f2) / (t3 - t2) - (f2 - f1) / (t2 - t1)) / (t3 - t1))
        b = max(0.0, (f3 - f2) / (t3 - t2) - c * (t3 + t2))
        a = per_row_widest - b * widest - c * widest * widest
        fixed = max(0.0, f3 - per_row_widest)
        a += max(0.0, *((probes[r, t] - fixed) / r - (a + b * t + c * t * t) for r, t in probes))
        return cls(fixed, (a, b, c), dict(probes))


_MODELS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, MemoryModel]] = weakref.WeakKeyDictionary()


def memory_model(
    model: nn.Module,
    params,
    *,
    method: str = "auto",
    setting: str = "params",
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> MemoryModel:
    """The memory model of the pass on ``model`` for a selection, fitted on four probe passes the first time (per
    selected parameters, method, dtype, autocast, forward context and checkpointing) and kept for the model's life.

    The probes are passes of the pass itself, so under FSDP or ZeRO-3 their forwards are collectives: every
    process must ask for the same selection at the same point (the first call), as every process runs the pass."""
    from .planning import resolve
    from .recorder import _checkpointed_layers
    from .rules import autocast_state

    resolved = resolve(model, params, setting)
    weight = next(iter(resolved.selected.values()))[1]
    checkpointing = tuple(id(m) for m in _checkpointed_layers(model, list(resolved.targets)))
    key = (frozenset(resolved.selected), method, weight.dtype, weight.device,
           autocast_state(weight.device.type), _hashable(forward_context), checkpointing)
    cache = _MODELS.setdefault(model, {})
    if key not in cache:
        widths = _probe_widths(model)
        shapes = [(1, width) for width in widths] + [(2, widths[-1])]
        probes = {shape: _probe(model, resolved.targets, method, setting, forward_context, *shape) for shape in shapes}
        cache[key] = MemoryModel.fit(probes)
    return cache[key]


def _probe_widths(model: nn.Module) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    limit = next((v for v in (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int) and v > 0), None)
    if limit is None or limit >= PROBE_WIDTHS[-1]:
        return PROBE_WIDTHS
    return max(limit // 4, 2), max(limit // 2, 3), max(limit, 4)


def _hashable(value) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


def _probe(model, targets, method, setting, forward_context, rows: int, width: int) -> int:
    """Bytes one micro-batch of ``rows`` random rows of ``width`` real tokens keeps, every token but the first
    counted (the head's L is then its largest, T - 1)."""
    from .planning import embeddings, parameter_shape
    from .recorder import Recorder, measurement_mode

    embedding = getattr(embeddings(model, output=False), "weight", None)
    vocab = parameter_shape(embedding)[0] if isinstance(embedding, Tensor) else getattr(
        getattr(model, "config", None), "vocab_size", 2)
    device = embedding.device if isinstance(embedding, Tensor) else next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=generator).to(device)
    real = torch.ones(rows, width, dtype=torch.bool, device=device)
    counted = real.clone()
    counted[:, 0] = False
    account = MemoryAccount(model)
    recorder = Recorder(model, targets, method, setting, 1.0, forward_context, account)
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with measurement_mode(model, recorder.checkpointed_layers), recorder.attached():
            recorder.measure(ids, real, counted, slice(0, width), width - 1)
    return account.bytes


def budget(device: torch.device, free_bytes: int | None, processes_on_device: int) -> float:
    """Bytes one process may plan for: ``MEMORY_SHARE`` of its part of the device's free memory.

    ``free_bytes`` None: read on a CUDA device, ``mem_get_info``'s free memory (shared by the processes on the
    device, so divided among them) plus this process's reserved-but-unallocated cache, which PyTorch hands out
    before asking the device for more and ``mem_get_info`` counts as used."""
    if free_bytes is None:
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MEMORY_SHARE * (free / processes_on_device + max(cached, 0))
    return MEMORY_SHARE * free_bytes / processes_on_device
