"""per_sample_grad_norms against a per-sample autograd loop (float64, one unpadded row at a time)."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutput

import gvm_trl.grad_norms.products as products
from gvm_trl.grad_norms import per_sample_grad_norms, per_sample_grad_norms_and_log_probs

VOCAB = 97
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_model(arch: str, tied: bool = False, **overrides) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tied,
            initializer_range=0.2, bos_token_id=0, eos_token_id=0, **overrides,
        )
        return GPT2LMHeadModel(config).eval()
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, initializer_range=0.2, **overrides,
    )
    return model_cls(config).eval()


def make_batch(padding: str = "right", lengths=(9, 14, 6), prompts=(3, 5, 2), seed: int = 1):
    """Ragged rows of ``prompts[b]`` prompt tokens then completion tokens (counted), padded on the ``padding``
    side; ``"both"``: TRL's layout, left-padded prompts followed by right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    prompt_width = max(prompts)
    width = max(lengths) if padding != "both" else prompt_width + max(n - p for n, p in zip(lengths, prompts))
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros(len(lengths), width)
    for b, (length, prompt) in enumerate(zip(lengths, prompts)):
        start = {"left": width - length, "right": 0, "both": prompt_width - prompt}[padding]
        cols = slice(start, start + length)
        input_ids[b, cols] = torch.randint(1, VOCAB, (length,), generator=g)
        attention_mask[b, cols] = 1
        loss_mask[b, cols] = (torch.arange(length) >= prompt).float()
    return input_ids, attention_mask, loss_mask


def reference_norms(model: nn.Module, input_ids, attention_mask, loss_mask, select: Callable[[str], bool]):
    """‖∇ Σ_t log p(y_t | y_<t)‖ over the parameters with a name ``select`` accepts, one row at a time."""
    ref = copy.deepcopy(model).double().eval()
    chosen = {id(p): p for n, p in ref.named_parameters(remove_duplicate=False) if select(n)}
    params = [p.requires_grad_(True) for p in chosen.values()]
    norms = []
    for ids, att, counted in zip(input_ids, attention_mask, loss_mask):
        keep = att.bool()
        ids, counted = ids[keep][None], counted[keep].bool()
        log_probs = ref(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        grads = torch.autograd.grad(log_probs[counted[1:]].sum(), params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want) / want).abs().max().item()


def everything(name: str) -> bool:
    return True


def hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    ]


# --------------------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("padding", ["right", "left", "both"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_all_parameters_match_autograd_loop(arch, tied, padding):
    model = tiny_model(arch, tied)
    batch = make_batch(padding)
    got = per_sample_grad_norms(model, *batch, params="all")
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_ghost_and_materialized_paths_agree(arch, monkeypatch):
    """Forcing either method gives the exact norms, and each forced run really takes its own path."""
    model = tiny_model(arch, tied=True)
    batch = make_batch("left")
    want = reference_norms(model, *batch, everything)
    materialized = []
    original = products._materialize
    monkeypatch.setattr(products, "_materialize", lambda *a: materialized.append(1) or original(*a))
    for method in ["ghost", "materialize", "auto"]:
        materialized.clear()
        got = per_sample_grad_norms(model, *batch, params="all", method=method)
        assert max_rel_err(got, want) < TOLERANCE, method
        assert bool(materialized) == (method == "materialize"), method


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_row_chunking(method, monkeypatch):
    """Above the memory budget the Grams and materialised gradients are built a few rows at a time."""
    model = tiny_model("gpt2", tied=True)
    batch = make_batch("left")
    whole = per_sample_grad_norms(model, *batch, params="all", method=method)
    monkeypatch.setattr(products, "_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(per_sample_grad_norms(model, *batch, params="all", method=method), whole)


def test_auto_follows_choose_method(monkeypatch):
    model = tiny_model("llama", tied=True)
    batch = make_batch()
    want = reference_norms(model, *batch, everything)
    for choice in ["ghost", "materialize"]:
        monkeypatch.setattr(products, "_choose_method", lambda *a, c=choice: c)
        assert max_rel_err(per_sample_grad_norms(model, *batch, params="all"), want) < TOLERANCE


def test_choose_method_rule():
    """The measured choices: ghost everywhere at T=128, q/k/v and MLP materialised at T=416, a wide head at 1024."""
    choose = products._choose_method
    assert [choose(128, 128, m, n) for m, n in [(256, 256), (768, 256), (49152, 256)]] == ["ghost"] * 3
    assert [choose(416, 416, m, n) for m, n in [(256, 256), (768, 256)]] == ["materialize"] * 2
    assert choose(1024, 1024, 49152, 256) == "materialize"
    assert choose(16, 16, 32, 32) == "ghost"


@pytest.mark.parametrize(
    ("arch", "tied", "target_modules"),
    [("llama", True, ["q_proj", "v_proj", "down_proj"]), ("gpt2", True, ["c_attn", "c_fc"]),
     ("qwen2", False, ["o_proj", "lm_head"])],
)
def test_lora(arch, tied, target_modules):
    model = get_peft_model(
        tiny_model(arch, tied),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.3, init_lora_weights=False,
            fan_in_fan_out=arch == "gpt2",  # Conv1D stores its weight transposed
        ),
    )
    batch = make_batch("left")
    got = per_sample_grad_norms(model, *batch)  # trainable: the LoRA factors only
    assert max_rel_err(got, reference_norms(model, *batch, lambda n: "lora_" in n)) < TOLERANCE
    got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE


def test_module_called_twice_and_biases():
    """A shared block applied twice: the per-sample gradient is the sum of both uses (cross terms, dense biases)."""

    class TwiceLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(VOCAB, 16)
            self.block = nn.Linear(16, 16)
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            h = torch.tanh(self.block(h)) + h
            h = torch.tanh(self.block(self.norm(h))) + h
            return CausalLMOutput(logits=self.head(h))

    model = TwiceLM()
    batch = make_batch()
    for method in ["auto", "ghost", "materialize"]:
        got = per_sample_grad_norms(model, *batch, params="all", method=method)
        assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE, method


def test_unused_module_warns_and_counts_zero():
    model = tiny_model("llama")
    model.model.unused = nn.Linear(4, 4)
    batch = make_batch()
    with pytest.warns(UserWarning, match=r"model\.unused\.weight.*not used"):
        got = per_sample_grad_norms(model, *batch, params="all")
    want = reference_norms(model, *batch, lambda n: "unused" not in n)
    assert max_rel_err(got, want) < TOLERANCE


def test_embedding_padding_idx():
    model = tiny_model("llama", tied=False, pad_token_id=5)
    assert model.get_input_embeddings().padding_idx == 5
    input_ids, attention_mask, loss_mask = make_batch()
    input_ids[:, 1] = 5  # the pad id inside real text: its embedding row gets no gradient
    batch = input_ids, attention_mask, loss_mask
    for method in ["auto", "ghost"]:
        got = per_sample_grad_norms(model, *batch, params="embed_tokens", method=method)
        assert max_rel_err(got, reference_norms(model, *batch, lambda n: "embed_tokens" in n)) < TOLERANCE


@settings(max_examples=8, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(2, 12), st.integers(1, 11)), min_size=1, max_size=4),
    padding=st.sampled_from(["left", "right", "both"]),
    seed=st.integers(0, 100),
)
def test_random_ragged_batches(rows, padding, seed):
    lengths = [length for length, _ in rows]
    prompts = [min(prompt, length - 1) for length, prompt in rows]
    batch = make_batch(padding, lengths, prompts, seed)
    model = _tied_llama()
    got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE


_MODELS: dict[str, nn.Module] = {}


def _tied_llama() -> nn.Module:
    return _MODELS.setdefault("llama", tiny_model("llama", tied=True))


# --------------------------------------------------------------------------------------------------------------
# Parameter selection


@pytest.mark.parametrize("tied", [False, True])
def test_named_selections(tied):
    model = tiny_model("qwen2", tied)
    batch = make_batch("left")
    embed = lambda n: "embed_tokens" in n  # noqa: E731
    head = (lambda n: "lm_head" in n or "embed_tokens" in n) if tied else (lambda n: "lm_head" in n)
    for params, select in [("embed_tokens", embed), ("lm_head", head), ("trainable", everything)]:
        got = per_sample_grad_norms(model, *batch, params=params)
        assert max_rel_err(got, reference_norms(model, *batch, select)) < TOLERANCE, params
    if tied:  # both names mean the shared matrix, with both its uses
        torch.testing.assert_close(
            per_sample_grad_norms(model, *batch, params="lm_head"),
            per_sample_grad_norms(model, *batch, params="embed_tokens"),
        )


@pytest.mark.parametrize(
    ("arch", "pattern"),
    [("llama", r"layers\.1\.(self_attn\.q_proj|mlp\.down_proj)"), ("llama", r"norm"), ("gpt2", r"\.ln_|wpe"),
     ("gpt2", r"ln_f\.bias"), ("qwen2", r"\.bias$"), ("gpt2", r"lm_head")],
)
def test_regex_selection(arch, pattern):
    model = tiny_model(arch, tied=True)
    batch = make_batch("left")
    got = per_sample_grad_norms(model, *batch, params=pattern)
    want = reference_norms(model, *batch, lambda n: re.search(pattern, n) is not None)
    assert max_rel_err(got, want) < TOLERANCE


def test_predicate_selection():
    model = tiny_model("llama")
    batch = make_batch()
    predicate = lambda name, p: p.ndim == 2 and "mlp" in name  # noqa: E731
    got = per_sample_grad_norms(model, *batch, params=predicate)
    assert max_rel_err(got, reference_norms(model, *batch, lambda n: "mlp" in n)) < TOLERANCE


def test_trainable_follows_requires_grad():
    model = tiny_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0" in name)
    batch = make_batch()
    got = per_sample_grad_norms(model, *batch)
    assert max_rel_err(got, reference_norms(model, *batch, lambda n: "layers.0" in n)) < TOLERANCE


def test_selection_errors():
    model = tiny_model("llama")
    batch = make_batch()
    with pytest.raises(ValueError, match="selects no parameter.*accepted.*trainable"):
        per_sample_grad_norms(model, *batch, params="no_such_parameter")
    with pytest.raises(ValueError, match="nor a valid regex"):
        per_sample_grad_norms(model, *batch, params="lm_head(")
    with pytest.raises(ValueError, match="selects no parameter"):
        per_sample_grad_norms(model, *batch, params=lambda n, p: False)
    with pytest.raises(TypeError, match="params must be"):
        per_sample_grad_norms(model, *batch, params=3)
    with pytest.raises(ValueError, match="method"):
        per_sample_grad_norms(model, *batch, method="fast")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="selects no parameter"):
        per_sample_grad_norms(model, *batch)


class ScaledMLP(nn.Module):
    """A Llama MLP whose output is scaled per channel by a parameter of the MLP itself (no fast rule covers it)."""

    def __init__(self, mlp: nn.Module, width: int):
        super().__init__()
        self.mlp = mlp
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return self.mlp(x) * self.scale


def test_parameter_without_fast_rule_is_measured_by_the_generic_rule():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = ScaledMLP(layer.mlp, 32)
    batch = make_batch("left")
    got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE
    got = per_sample_grad_norms(model, *batch, params=r"mlp\.scale")
    assert max_rel_err(got, reference_norms(model, *batch, lambda n: "mlp.scale" in n)) < TOLERANCE


def test_input_validation():
    model = tiny_model("llama")
    input_ids, attention_mask, loss_mask = make_batch("left")
    first = loss_mask.clone()
    first[:, 0] = 1
    with pytest.raises(ValueError, match="loss_mask\\[:, 0\\]"):
        per_sample_grad_norms(model, input_ids, attention_mask, first)
    on_padding = loss_mask.clone()
    on_padding[2, 0:2] = 1
    on_padding[2, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        per_sample_grad_norms(model, input_ids, attention_mask, on_padding)
    with pytest.raises(ValueError, match="shape"):
        per_sample_grad_norms(model, input_ids, attention_mask[:, 1:], loss_mask)


# --------------------------------------------------------------------------------------------------------------
# Norms and tempered log-probabilities from one forward (the riding probes' old log-probabilities)


def padded_arange(input_ids):
    """The position ids a transformers model uses when given none: 0..T-1 over the padded width, every row."""
    return torch.arange(input_ids.shape[1]).expand_as(input_ids)


def reference_norms_at(model: nn.Module, input_ids, attention_mask, loss_mask, position_ids):
    """As :func:`reference_norms` over all parameters, but each row kept at its padded width and given positions."""
    ref = copy.deepcopy(model).double().eval()
    params = list(ref.parameters())
    norms = []
    for ids, att, counted, positions in zip(input_ids, attention_mask, loss_mask, position_ids):
        logits = ref(input_ids=ids[None], attention_mask=att[None], position_ids=positions[None]).logits[0]
        log_probs = logits[:-1].log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        grads = torch.autograd.grad(log_probs[counted[1:].bool()].sum(), params, allow_unused=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    return torch.stack(norms)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fused_log_probs_are_the_models_own_and_norms_match_the_loop_at_those_positions(arch):
    """TRL's layout (left-padded prompts, right-padded completions), temperature 0.7: the scored tokens'
    log-probabilities equal a plain forward given no position ids (so arange over the padded width, as in TRL's
    own forward), and the norms a float64 loop at the same positions. A row scored but not counted has norm 0, a
    row counted but not scored NaN log-probabilities. GPT-2's absolute positions make those norms differ from the
    default (positions counted over real tokens); rotary models' do not, beyond rounding."""
    model = tiny_model(arch, tied=True)
    input_ids, attention_mask, completion = make_batch("both", lengths=(9, 14, 6, 11), prompts=(3, 5, 2, 4))
    loss_mask, score_mask = completion.clone(), completion.clone()
    loss_mask[1] = 0  # scored only
    score_mask[3] = 0  # counted only
    positions = padded_arange(input_ids)
    norms, log_probs = per_sample_grad_norms_and_log_probs(
        model, input_ids, attention_mask, loss_mask, score_mask, temperature=0.7, position_ids=positions, params="all"
    )
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / 0.7
    want = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    scored = score_mask[:, 1:].bool()
    assert log_probs.shape == input_ids.shape and log_probs.dtype == torch.float32
    assert (log_probs[:, 1:][scored] - want[scored]).abs().max() <= 1e-6
    assert log_probs[:, 1:][~scored].isnan().all() and log_probs[:, 0].isnan().all()
    assert norms[1] == 0 and (norms[[0, 2, 3]] > 0).all()
    at_positions = reference_norms_at(model, input_ids, attention_mask, loss_mask, positions)
    assert max_rel_err(norms[[0, 2, 3]], at_positions[[0, 2, 3]]) < TOLERANCE
    default = per_sample_grad_norms(model, input_ids, attention_mask, loss_mask, params="all")
    if arch == "gpt2":
        assert max_rel_err(default[[0, 2, 3]], at_positions[[0, 2, 3]]) > 1e-3
    else:
        torch.testing.assert_close(norms, default, rtol=1e-5, atol=0)


def test_fused_pass_keeps_the_default_norms_and_micro_batches_agree():
    """Without position ids the fused pass gives per_sample_grad_norms' norms; micro-batches of any size (each
    trimmed to its own real columns) give the same norms and log-probabilities; a forward context wraps the
    forward (here an autocast that is off)."""
    model = tiny_model("qwen2", tied=True)
    input_ids, attention_mask, completion = make_batch("both", lengths=(9, 14, 6, 11, 4), prompts=(3, 5, 2, 4, 1))
    whole_norms, whole = per_sample_grad_norms_and_log_probs(model, input_ids, attention_mask, completion, completion,
                                                             params="all")
    torch.testing.assert_close(whole_norms, per_sample_grad_norms(model, input_ids, attention_mask, completion,
                                                                  params="all"))
    entered = []

    def context():
        entered.append(1)
        return torch.autocast("cpu", enabled=False)

    for size in (1, 2):
        norms, log_probs = per_sample_grad_norms_and_log_probs(
            model, input_ids, attention_mask, completion, completion, params="all", micro_batch_size=size,
            forward_context=context,
        )
        torch.testing.assert_close(norms, whole_norms)
        torch.testing.assert_close(log_probs, whole, equal_nan=True)
    assert len(entered) == 5 + 3


def test_fused_pass_input_validation():
    model = tiny_model("llama")
    input_ids, attention_mask, loss_mask = make_batch("left")
    first = loss_mask.clone()
    first[:, 0] = 1
    with pytest.raises(ValueError, match="score_mask\\[:, 0\\]"):
        per_sample_grad_norms_and_log_probs(model, input_ids, attention_mask, loss_mask, first)
    with pytest.raises(ValueError, match="shape"):
        per_sample_grad_norms_and_log_probs(model, input_ids, attention_mask, loss_mask, loss_mask[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        per_sample_grad_norms_and_log_probs(model, input_ids, attention_mask, loss_mask, loss_mask, temperature=0)


# --------------------------------------------------------------------------------------------------------------
# Calling conventions


def test_loss_mask_dtypes_and_rows_without_completion():
    model = tiny_model("gpt2", tied=True)
    input_ids, attention_mask, loss_mask = make_batch()
    loss_mask[1] = 0
    want = per_sample_grad_norms(model, input_ids, attention_mask, loss_mask)
    assert want[1] == 0 and (want[[0, 2]] > 0).all()
    for mask in (loss_mask.bool(), loss_mask.long(), loss_mask.to(torch.int8)):
        torch.testing.assert_close(per_sample_grad_norms(model, input_ids, attention_mask, mask), want)
    zeros = per_sample_grad_norms(model, input_ids, attention_mask, torch.zeros_like(loss_mask))
    assert zeros.dtype == torch.float32 and not zeros.any()


def test_micro_batches_give_the_same_norms():
    model = tiny_model("qwen2", tied=True)
    batch = make_batch("left", lengths=(9, 14, 6, 11, 4), prompts=(3, 5, 2, 4, 1))
    whole = per_sample_grad_norms(model, *batch, params="all")
    for size in (1, 2, 4):
        torch.testing.assert_close(per_sample_grad_norms(model, *batch, params="all", micro_batch_size=size), whole)


def test_no_attention_mask_and_grad_disabled_callers():
    model = tiny_model("llama", tied=True)
    input_ids, _, loss_mask = make_batch(lengths=(8, 8, 8))
    want = per_sample_grad_norms(model, input_ids, torch.ones_like(input_ids), loss_mask)
    torch.testing.assert_close(per_sample_grad_norms(model, input_ids, None, loss_mask), want)
    with torch.no_grad():
        torch.testing.assert_close(per_sample_grad_norms(model, input_ids, None, loss_mask), want)
    with torch.inference_mode():
        torch.testing.assert_close(per_sample_grad_norms(model, input_ids, None, loss_mask), want)


def test_bf16_close_to_fp32():
    model = tiny_model("llama", tied=True)
    batch = make_batch("left")
    fp32 = per_sample_grad_norms(model, *batch, params="all")
    bf16 = per_sample_grad_norms(model.to(torch.bfloat16), *batch, params="all")
    assert bf16.dtype == torch.float32
    assert ((bf16 / fp32) - 1).abs().max() < 0.03


# --------------------------------------------------------------------------------------------------------------
# Model state and cost


def test_model_state_restored_and_dropout_off():
    model = tiny_model("llama", tied=True, attention_dropout=0.5)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    model = get_peft_model(model, lora)
    model.train()
    model.base_model.model.model.layers[1].eval()  # mixed modes are restored module by module
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    lora[0].grad = torch.randn_like(lora[0])  # a pending accumulation
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    hooks = hook_counts(model)
    batch = make_batch("left")

    first = per_sample_grad_norms(model, *batch, params="all")
    second = per_sample_grad_norms(model, *batch, params="all")

    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert max_rel_err(first, reference_norms(model, *batch, everything)) < TOLERANCE
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert hook_counts(model) == hooks
    for p, before in zip(model.parameters(), grads):
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)


def test_state_restored_after_an_error():
    model = tiny_model("llama")
    model.train()
    hooks = hook_counts(model)

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grad_norms(model, *make_batch(), params="all")
    handle.remove()
    assert hook_counts(model) == hooks
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    """Checkpointing stays on (layers run twice) and the re-run forward hooks are not counted twice."""
    model = tiny_model("llama", tied=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    runs = []
    model.model.layers[1].input_layernorm.register_forward_pre_hook(lambda *_: runs.append(1))
    batch = make_batch("left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_grad_norms(model, *batch, params="all")
        assert len(runs) == 2
        assert max_rel_err(got, reference_norms(model, *batch, everything)) < TOLERANCE
        runs.clear()
        got = per_sample_grad_norms(model, *batch, params=r"layers\.1\.mlp")
        assert len(runs) == 2
        assert max_rel_err(got, reference_norms(model, *batch, lambda n: "layers.1.mlp" in n)) < TOLERANCE
        runs.clear()
        per_sample_grad_norms(model, *batch, params="lm_head")  # nothing to measure inside the layers
        assert len(runs) == 1
    assert model.training


def test_head_only_backward_stops_at_the_head():
    """With only the (untied) head measured, nothing below it builds an autograd graph."""
    model = tiny_model("llama", tied=False)
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_())  # like PEFT/HF do
    graph = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, a, out: graph.append(out[0] if isinstance(out, tuple) else out))
    head_inputs = []
    model.lm_head.register_forward_hook(lambda m, a, out: head_inputs.append(a[0].shape))
    batch = make_batch()
    got = per_sample_grad_norms(model, *batch, params="lm_head")
    assert graph and not any(t.requires_grad for t in graph)
    counted = int((batch[2][:, 1:] != 0).sum(1).max())
    assert head_inputs == [torch.Size([3, counted, 32])]  # only the positions whose next token counts
    assert max_rel_err(got, reference_norms(model, *batch, lambda n: "lm_head" in n)) < TOLERANCE


# --------------------------------------------------------------------------------------------------------------
# Host syncs and planning-time work (issue 18)


def test_counter_sees_host_syncs():
    from gvm_trl.grad_norms.counting import count

    x = torch.tensor([0.5, -1.0, 2.0])
    assert count(lambda: x * 2).syncs == 0
    assert count(lambda: x.sum().item()).sync_ops == {"_local_scalar_dense": 1}
    assert count(lambda: bool(x.any())).syncs == 1
    assert count(lambda: x.nonzero()).sync_ops == {"nonzero": 1}
    assert count(lambda: x[x > 0]).sync_ops == {"index": 1}
    assert count(lambda: torch.unique(x)).syncs == 1
    assert count(lambda: x.tolist()).sync_ops == {"tolist": 1}


@pytest.mark.parametrize("padding", ["left", "both"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_pass_reads_the_device_once(arch, padding):
    """One host sync per call (the input checks and micro-batch spans, read together before the forward), none in
    the forward, the backward or the reduction: transformers' own mask checks are skipped by a prepared mask."""
    from gvm_trl.grad_norms.counting import count

    model = tiny_model(arch, tied=True)
    batch = make_batch(padding)
    per_sample_grad_norms(model, *batch, params="all")  # once-per-model checks happen here
    counts = count(lambda: per_sample_grad_norms(model, *batch, params="all"))
    assert counts.sync_ops == {"tolist": 1}
    micro = count(lambda: per_sample_grad_norms(model, *batch, params="all", micro_batch_size=1))
    assert micro.sync_ops == {"tolist": 1}


def test_channelwise_checks_and_sensitivities_not_rerun_per_call(monkeypatch):
    """The channel-wise check runs once per module (at planning), and a call runs one forward-mode pass for all
    the RMSNorms of a model (their u does not depend on their weights), not one check and pass per norm."""
    import gvm_trl.grad_norms.rules as rules

    model = tiny_model("llama", tied=False)
    batch = make_batch("left")
    checks, passes = [], []
    original_check, original_tangent = rules.channel_sensitivity, rules._tangent
    monkeypatch.setattr(rules, "channel_sensitivity", lambda *a: checks.append(a[0]) or original_check(*a))
    monkeypatch.setattr(rules, "_tangent", lambda *a: passes.append(a[0]) or original_tangent(*a))
    from gvm_trl.grad_norms import plan_per_sample_grad_norms

    plan_per_sample_grad_norms(model, "all")
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 5 and set(checks) == set(norms)
    checks.clear()
    passes.clear()
    want = per_sample_grad_norms(model, *batch, params="all")
    assert checks == [] and len(passes) == 1
    assert max_rel_err(want, reference_norms(model, *batch, everything)) < TOLERANCE


def test_sensitivity_sharing_needs_equal_modules():
    """Norms with a different eps compute a different u: they are not stacked with the others."""
    from gvm_trl.grad_norms.rules import probe_channelwise, sensitivity_group

    model = tiny_model("llama", tied=False)
    layers = model.model.layers
    layers[1].input_layernorm.variance_epsilon = 0.5
    for norm in (layers[0].input_layernorm, layers[1].input_layernorm, layers[1].post_attention_layernorm):
        probe_channelwise(norm, "weight")
    groups = [sensitivity_group(n, "weight") for n in (layers[0].input_layernorm, layers[1].input_layernorm,
                                                       layers[1].post_attention_layernorm)]
    assert None not in groups and groups[0] is groups[2] and groups[1] is not groups[0]
    batch = make_batch("right")
    assert max_rel_err(per_sample_grad_norms(model, *batch, params="all"),
                       reference_norms(model, *batch, everything)) < TOLERANCE


def test_prepared_mask_only_where_it_gives_the_same_logits():
    from gvm_trl.grad_norms.recorder import takes_prepared_mask

    assert takes_prepared_mask(tiny_model("llama"))
    windowed = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not takes_prepared_mask(windowed)
    batch = make_batch("left", lengths=(9, 14, 6), prompts=(3, 5, 2))
    assert max_rel_err(per_sample_grad_norms(windowed, *batch, params="all"),
                       reference_norms(windowed, *batch, everything)) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_log_probs_match_cross_entropy(dtype, monkeypatch):
    """The chunked head step gives cross-entropy's value and gradient (in the logits' dtype), ignored rows too."""
    import gvm_trl.grad_norms.recorder as recorder

    monkeypatch.setattr(recorder, "_HEAD_CHUNK_ELEMENTS", 5 * 37)  # bf16: 10 chunks of 5 rows
    logits = torch.randn(50, 37, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    targets = torch.randint(0, 37, (50,), generator=torch.Generator().manual_seed(1))
    targets[::3] = -100
    got = recorder._CountedLogProbs.apply(logits, targets)
    (grad,) = torch.autograd.grad(got, logits)
    want = -nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, logits)
    assert grad.dtype == dtype and grad[::3].abs().max() == 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_micro_batch_from_free_gpu_memory(monkeypatch):
    """Without micro_batch_size: every row on a CPU; on a GPU as many rows as the estimate fits in free memory."""
    from gvm_trl.grad_norms import rows_that_fit

    model = tiny_model("qwen2", tied=True)
    shape = torch.Size([64, 160])
    assert rows_that_fit(model, "all", shape, torch.device("cpu")) == 64
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    rows = {}
    for free in (1 << 20, 1 << 26, 1 << 40):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        rows[free] = rows_that_fit(model, "all", shape, torch.device("cuda"))
    assert rows[1 << 20] == 1 and 1 < rows[1 << 26] < 64 and rows[1 << 40] == 64
