"""The gradient-norm pass's GPU-only logic, run on a CPU (issue 26): shared Grams, the low-precision Gram kernel and
its fallback, the prepared-mask guard in bf16/fp16, host syncs per call, replays under autocast, the memory
estimate and the micro-batch sizing from an injected free-memory figure, and the evaluation's RNG devices."""

from __future__ import annotations

import pytest
import torch
from test_grad_norms import make_batch, max_rel_err, reference_norms, tiny_model

import gvm_trl.grad_norms.products as products
from gvm_trl.grad_norms import per_sample_grad_norms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gram_spy(monkeypatch) -> list[torch.Size]:
    shapes = []
    original = products._gram
    monkeypatch.setattr(products, "_gram", lambda x: shapes.append(x.shape) or original(x))
    return shapes


# --------------------------------------------------------------------------------------------------------------
# B8: layers reading one input share its Gram


def test_qkv_share_their_input_gram(monkeypatch):
    """q/k/v read one input: one Gram of it per layer (stacked over layers), plus one per output gradient."""
    model = tiny_model("llama")
    batch = make_batch("left")
    pattern = r"self_attn\.(q|k|v)_proj\.weight"
    shapes = _gram_spy(monkeypatch)
    got = per_sample_grad_norms(model, *batch, params=pattern)
    layers, rows = len(model.model.layers), batch[0].shape[0]
    assert sum(s[0] for s in shapes) == layers * rows * (1 + 3)  # was (3 + 3): no input Gram was shared
    want = reference_norms(model, *batch, lambda n: any(f"{p}_proj" in n for p in "qkv"))
    assert max_rel_err(got, want) < 1e-4


def test_gate_up_and_qkv_share_on_every_layer(monkeypatch):
    """All weights of a Llama: per layer one Gram each of the attention input, o_proj's, the MLP input and
    down_proj's input; the norms stay those of the per-sample loop."""
    model = tiny_model("llama")
    batch = make_batch("both")
    shapes = _gram_spy(monkeypatch)
    got = per_sample_grad_norms(model, *batch, params=r"layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
    layers, rows = len(model.model.layers), batch[0].shape[0]
    inputs, outputs = 4, 7  # (qkv, o, gate/up, down) inputs; q, k, v, o, gate, up, down output gradients
    assert sum(s[0] for s in shapes) == layers * rows * (inputs + outputs)
    want = reference_norms(model, *batch, lambda n: "_proj" in n)
    assert max_rel_err(got, want) < 1e-4
