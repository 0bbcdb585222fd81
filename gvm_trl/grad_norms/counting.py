"""Counting what a call issues: ATen ops (each a kernel launch on a GPU), host syncs, FLOPs and bytes.

Counts do not depend on the machine's load, so they are how the pass's GPU cost is tracked on a CPU. Used by
``benchmarks/grad_norms.py --count`` and by the tests that keep the pass free of host syncs.

A *host sync* is an op whose result the host must wait for on a GPU:

* ``aten._local_scalar_dense`` — every ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor (``.any()`` or
  ``.all()`` used in an ``if``, ``is_nonzero``) ends in it;
* ops whose output size depends on the data: ``nonzero``, ``unique`` and its variants, ``masked_select``,
  ``repeat_interleave`` without ``output_size``, and indexing with a boolean mask (``index.Tensor`` or
  ``index_put`` with a bool index, which runs ``nonzero`` inside the kernel);
* copies of a non-CPU tensor to the CPU (``_to_copy``/``copy_`` to ``cpu``), and ``tolist()``/``numpy()`` of a
  tensor (on a CPU these read memory without any ATen op, so they are seen as torch functions).

Why hand-written: ``torch.cuda.set_sync_debug_mode`` only sees CUDA syncs, so it cannot count on a CPU, and the
profiler does not say which ops would sync; a ``TorchDispatchMode`` sees every op below autograd (backward too).
``torch.utils.flop_counter`` is used for FLOPs, except for attention, whose counter asserts on grouped-query shapes
(fewer k/v heads than query heads, torch 2.11): attention is counted here as 2·B·H_q·T_q·T_k·(d_k + d_v) forward
and twice that backward.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

_DATA_DEPENDENT = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "unique_dim_consecutive", "masked_select", "nonzero_static"}
# Non-view ops that launch no kernel: metadata checks, allocations, reshapes that return a view in all but name.
_NO_KERNEL = {"detach", "alias", "lift_fresh", "_unsafe_view", "is_same_size", "_has_same_storage_numel",
              "_efficientzerotensor", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "_reshape_alias", "resize_", "set_", "_make_dual", "_unpack_dual"}
_ATTENTION_FORWARD = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "_flash_attention_forward", "_efficient_attention_forward"}
_ATTENTION_BACKWARD = {name + "_backward" for name in _ATTENTION_FORWARD}


@dataclass
class Counts:
    """What one counted region issued."""

    ops: int = 0
    syncs: int = 0
    flops: int = 0
    bytes: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)

    def as_dict(self, top: int = 12) -> dict:
        return {"ops": self.ops, "host_syncs": self.syncs, "gflop": round(self.flops / 1e9, 3),
                "gbytes": round(self.bytes / 1e9, 3), "sync_ops": dict(self.sync_ops),
                "top_ops": dict(self.by_op.most_common(top))}


def _is_sync(func, args, kwargs) -> bool:
    name = func._overloadpacket.__name__
    if name == "_local_scalar_dense" or name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name in ("_to_copy", "copy_"):
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        return (isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None
                and torch.device(target).type == "cpu")
    return False


def _attention_flops(name: str, args) -> int:
    """2·B·H_q·T_q·T_k·(d_k + d_v) forward, twice that backward (q, k, v in [B, H, T, d] order)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.ndim == 4]
    if name in _ATTENTION_BACKWARD:
        tensors = tensors[1:]  # grad_out first
    if name in ("_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
                "_efficient_attention_backward"):
        q, k, v = (t.transpose(1, 2) for t in tensors[:3])  # these take [B, T, H, d]
    else:
        q, k, v = tensors[:3]
    batch, heads, t_q, d_k = q.shape
    forward = 2 * batch * heads * t_q * k.shape[-2] * (d_k + v.shape[-1])
    return 2 * forward if name in _ATTENTION_BACKWARD else forward


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Counts ATen ops that launch a kernel (not views, metadata checks or bare allocations), host syncs, FLOPs and bytes read and written (inputs plus outputs of each op)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket.__name__ in _NO_KERNEL:
            return out
        counts, name = self.counts, func._overloadpacket.__name__
        counts.ops += 1
        counts.by_op[name] += 1
        if _is_sync(func, args, kwargs):
            counts.syncs += 1
            counts.sync_ops[name] += 1
        if name in _ATTENTION_FORWARD or name in _ATTENTION_BACKWARD:
            counts.flops += _attention_flops(name, args)
        elif func._overloadpacket in flop_registry:
            counts.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        counts.bytes += _nbytes((args, kwargs)) + _nbytes(out)
        return out


class _HostReads(TorchFunctionMode):
    """Counts ``tolist``/``numpy`` of CPU tensors as host syncs (of a GPU tensor they copy to the CPU: counted by
    :class:`OpCounter`)."""

    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and args and args[0].device.type == "cpu":
            self.counts.syncs += 1
            self.counts.sync_ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> Counts:
    """Counts of one call of ``fn()``."""
    with OpCounter() as counter, _HostReads(counter.counts):
        fn()
    return counter.counts
