"""One micro-batch of the pass, and how a tensor seen by a hook splits into its samples and positions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How a tensor leads with the batch: [B, ...] (``flat=False``) or [B·P, ...] with the rows of each sample
    consecutive (``flat=True``, as MoE blocks see tokens); ``mask`` [B, P] marks real positions (None: no
    position dimension, or all positions real)."""

    flat: bool
    mask: Tensor | None


@dataclass
class Batch:
    """One micro-batch: its real tokens, and where the head reads (position t-1 for a counted or scored token t) and
    what.

    The head's L positions are fewer than the T of the layers below (position 0 never counts), so a tensor
    leading with [B, T] is never a head tensor: that is how hooks tell which mask applies. ``targets`` holds the
    counted tokens (-100 elsewhere: no loss, so a zero output gradient); ``scored`` marks the head positions whose
    log-probability is returned (None: none is).
    """

    valid: Tensor
    head_index: Tensor
    head_valid: Tensor
    targets: Tensor
    scored: Tensor | None = None
    tokens: Tensor | None = None
    _valid_by_device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, length: int, score_mask: Tensor | None = None
    ) -> Batch:
        """``length``: the most counted or scored tokens in a row (known to the caller, so no host sync here)."""
        counted = loss_mask[:, 1:]
        read = counted if score_mask is None else counted | score_mask[:, 1:]
        order = torch.argsort((~read).to(torch.int8), dim=1, stable=True)[:, :length]
        head_valid = torch.arange(length, device=input_ids.device) < read.sum(1, keepdim=True)
        tokens = input_ids.gather(1, order + 1)
        targets = torch.where(head_valid & counted.gather(1, order), tokens, -100)
        if score_mask is None:
            return cls(attention_mask, order, head_valid, targets)
        return cls(attention_mask, order, head_valid, targets, head_valid & score_mask[:, 1:].gather(1, order), tokens)

    @property
    def size(self) -> int:
        return self.valid.shape[0]

    def valid_on(self, device: torch.device) -> Tensor:
        """``valid`` on ``device``, copied once per micro-batch (layers of a model split by ``device_map``)."""
        if device == self.valid.device:
            return self.valid
        if device not in self._valid_by_device:
            self._valid_by_device[device] = self.valid.to(device)
        return self._valid_by_device[device]

    def layout(self, x: Tensor) -> Layout | None:
        """How ``x`` splits into samples, or None where its leading dimension is not the batch; the mask is on
        ``x``'s device.

        The head's positions need no mask: its input is zeroed and its output gradient is 0 where nothing counts.
        """
        batch, length, head_length = self.size, self.valid.shape[1], self.head_valid.shape[1]
        if x.ndim >= 3 and x.shape[0] == batch and x.shape[1] == length:
            return Layout(False, self.valid_on(x.device))
        if x.ndim >= 1 and x.shape[0] == batch * length:
            return Layout(True, self.valid_on(x.device))
        if x.ndim >= 1 and head_length > 1 and x.shape[0] == batch * head_length:
            return Layout(True, None)
        if x.ndim >= 1 and x.shape[0] == batch:
            return Layout(False, None)
        return None

    def per_sample(self, x: Tensor, layout: Layout) -> Tensor:
        """``x`` as [B, ...] (a flat layout unfolded to [B, P, ...])."""
        return x.reshape(self.size, -1, *x.shape[1:]) if layout.flat else x

    def rows(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``x`` as [B, P', n] (n its last dimension, P' all other positions of a sample) and which are real."""
        layout = self.layout(x)
        if layout is None:
            raise RuntimeError(f"a tensor of shape {tuple(x.shape)} does not lead with the batch dimension")
        x = self.per_sample(x, layout)
        rows = x.reshape(self.size, -1, x.shape[-1])
        mask = layout.mask
        inner = math.prod(x.shape[2:-1]) if x.ndim > 2 else 1
        if mask is not None and inner != 1:
            mask = mask[:, :, None].expand(-1, -1, inner).reshape(self.size, -1)
        return rows, mask


def broadcast_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A [B, P] mask shaped to broadcast against a per-sample [B, P, ...] tensor."""
    return mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))
