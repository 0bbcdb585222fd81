"""Every parameter of real architectures gets an exact per-sample norm, by a fast rule or the generic one.

Tiny random models (2–3 layers, hidden 32, vocabulary 97) of dense, MoE, Mamba and hybrid causal LMs, against the
float64 per-sample autograd loop of test_grad_norms.py.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import transformers
from test_grad_norms import VOCAB, everything, make_batch, max_rel_err, reference_norms
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from gvm_trl.grad_norms import GradNormPlan, per_sample_grad_norms, plan_per_sample_grad_norms

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, intermediate_size=64, num_hidden_layers=2),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, intermediate_size=64, num_hidden_layers=2),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, intermediate_size=64, num_hidden_layers=2, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
        initializer_range=0.2,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, **MOE, intermediate_size=64, num_hidden_layers=2, num_experts=4, head_dim=8
    ),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **COMMON, **MOE, intermediate_size=64, num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1,
        first_k_dense_replace=1, head_dim=8, n_group=1, topk_group=1,
    ),
    "mamba": lambda: transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4
    ),
    "nemotron_h": lambda: transformers.NemotronHConfig(  # Mamba-2, attention and MoE blocks
        **COMMON, **MOE, layers_block_type=["mamba", "attention", "moe"], head_dim=8, intermediate_size=64,
        mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=8, n_routed_experts=4,
        moe_shared_expert_intermediate_size=16,
    ),
}
# Parameters no fast rule covers, by name; Mamba mixers also read their conv1d and dt_proj directly.
GENERIC = {
    "llama": None, "qwen2": None, "gemma2": None, "gpt2": None,
    "qwen3_moe": r"mlp\.(experts\.(gate_up|down)_proj|gate\.weight)$",
    "glm4_moe": r"mlp\.(experts\.(gate_up|down)_proj|gate\.weight)$",
    "mamba": r"mixer\.(A_log|D|conv1d\.(weight|bias))$",
    "nemotron_h": r"mixer\.(A_log|D|dt_bias|conv1d\.(weight|bias)|experts\.(up|down)_proj|gate\.weight)$",
}
READ_BY_THE_MIXER = {"mamba": r"mixer\.(conv1d|dt_proj)\.", "nemotron_h": r"mixer\.conv1d\."}
_MODELS: dict[str, nn.Module] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _quiet_kernel_fallbacks():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")
        yield


def tiny(arch: str) -> nn.Module:
    """The float32 model (built once per test session); MoE experts run their default (grouped_mm) kernel."""
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    return _MODELS[arch]


def eager_experts(model: nn.Module) -> nn.Module:
    """A copy whose MoE experts loop in plain torch (grouped_mm has no float64 kernel on CPU)."""
    model = copy.deepcopy(model)
    if hasattr(model.config, "_experts_implementation"):
        model.config._experts_implementation = "eager"
    return model


def reference(model: nn.Module, batch, select=everything):
    return reference_norms(eager_experts(model), *batch, select)


ARCHS = list(CONFIGS)


@pytest.mark.parametrize("padding", ["right", "both"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_matches_the_float64_loop(arch, padding):
    model = tiny(arch)
    batch = make_batch(padding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic-rule warnings are tested below
        got = per_sample_grad_norms(model, *batch, params="all")
    assert got.shape == (3,) and (got > 0).all()
    assert max_rel_err(got, reference(model, batch)) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_float64_models_match_to_1e6(arch):
    """In float64 what is left is the models' own float32 islands (RMSNorm, routers, Mamba's A): ~3e-8."""
    model = eager_experts(tiny(arch)).double()
    batch = make_batch("right")  # Gemma2's eager attention gives NaN in float64 with left padding, by itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference(model, batch)) < 1e-6


@pytest.mark.parametrize("arch", ["qwen3_moe", "nemotron_h"])
def test_trainable_means_requires_grad(arch):
    """params="trainable" spans exactly the parameters with requires_grad, generic ones included."""
    model = copy.deepcopy(tiny(arch))
    pattern = GENERIC[arch] + "|layers.0.mixer.in_proj|lm_head"
    for name, p in model.named_parameters():
        p.requires_grad_(re.search(pattern, name) is not None)
    batch = make_batch("left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_grad_norms(model, *batch)
    want = reference(model, batch, lambda n: re.search(pattern, n) is not None)
    assert max_rel_err(got, want) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_names_the_generic_parameters_and_warns(arch):
    model = tiny(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_per_sample_grad_norms(model, "all", setting="gvm_grad_params")
    assert isinstance(plan, GradNormPlan)
    names = {n for n, _ in model.named_parameters()}
    assert {u.parameter for u in plan.uses} == names  # every parameter has a rule
    pattern = GENERIC[arch]
    generic = set(plan.parameters("generic"))
    assert generic == {n for n in names if pattern and re.search(pattern, n)}
    warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if not generic:
        assert warned == []
        return
    assert len(warned) == 1
    message = warned[0]
    assert message.startswith(f"gvm_grad_params='all': {len(generic)} parameters")
    assert sorted(generic)[0] in message or any(u.parameter in message for u in plan.generic[:4])
    assert "generic rule" in message and "per sample" in message and "Narrow gvm_grad_params" in message


def test_plan_rules_of_known_layers():
    plan = plan_per_sample_grad_norms(tiny("gemma2"), "all")
    by_name = {u.parameter: u for u in plan.uses if u.module != "lm_head"}
    embedding = by_name["model.embed_tokens.weight"]
    assert (embedding.rule, embedding.checked) == ("embedding", True)  # Gemma's scaled embedding: its scale
    head = [u for u in plan.uses if u.module == "lm_head"]  # tied: the head is the matrix's second use
    assert [(u.parameter, u.rule) for u in head] == [("model.embed_tokens.weight", "linear")]
    assert by_name["model.layers.0.self_attn.q_proj.weight"].rule == "linear"
    assert by_name["model.layers.0.input_layernorm.weight"].rule == "channelwise"
    gpt2 = {u.parameter: u.rule for u in plan_per_sample_grad_norms(tiny("gpt2"), "all").uses}
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "conv1d" and gpt2["transformer.wpe.weight"] == "embedding"
    assert gpt2["transformer.h.0.ln_1.bias"] == "channelwise"


@pytest.mark.parametrize("arch", ["mamba", "nemotron_h"])
def test_parameters_read_by_a_parent_module_are_measured_there(arch):
    """Mamba mixers pass self.conv1d.weight (and dt_proj.weight) to functions instead of calling the submodule."""
    model = tiny(arch)
    pattern = READ_BY_THE_MIXER[arch]
    batch = make_batch("left")
    warning = r"mixer\.conv1d\.bias \(in \w+\.layers\.0\.mixer\).*used outside their own module's forward"
    with pytest.warns(UserWarning, match=warning):
        got = per_sample_grad_norms(model, *batch, params=pattern)
    want = reference(model, batch, lambda n: re.search(pattern, n) is not None)
    assert max_rel_err(got, want) < 1e-4


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_generic_modules(reentrant):
    model = copy.deepcopy(tiny("nemotron_h"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    batch = make_batch("both")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference(model, batch)) < 1e-4
    assert model.training


def test_generic_rule_vectorised_and_looped_agree(monkeypatch):
    """Mamba's mixer runs under torch.func.vmap; forcing the per-sample loop gives the same norms."""
    import gvm_trl.grad_norms.rules as rules

    model = tiny("mamba")
    batch = make_batch("left")
    pattern = r"mixer\.(A_log|D)$"
    monkeypatch.setattr(rules, "_VMAP_UNSUPPORTED", set())
    vectorised = per_sample_grad_norms(model, *batch, params=pattern)
    assert type(model.backbone.layers[0].mixer) not in rules._VMAP_UNSUPPORTED  # vmap did run
    monkeypatch.setattr(rules, "_VMAP_UNSUPPORTED", {type(model.backbone.layers[0].mixer)})
    looped = per_sample_grad_norms(model, *batch, params=pattern)
    torch.testing.assert_close(looped, vectorised, rtol=1e-5, atol=0)
    assert max_rel_err(vectorised, reference(model, batch, lambda n: re.search(pattern, n) is not None)) < 1e-4


def test_bf16_moe_close_to_fp32():
    model = tiny("qwen3_moe")
    batch = make_batch("left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = per_sample_grad_norms(model, *batch, params="all")
        bf16 = per_sample_grad_norms(copy.deepcopy(model).to(torch.bfloat16), *batch, params="all")
    assert ((bf16 / fp32) - 1).abs().max() < 0.03


# --------------------------------------------------------------------------------------------------------------
# Subclasses: a fast rule only where the module computes what it assumes


class TimesThreeEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 3.0


class NormalisedEmbedding(nn.Embedding):
    """Rows divided by their RMS: not c·W[ids], found by the probe at planning."""

    def forward(self, ids):
        rows = super().forward(ids)
        return rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + 1e-6)


class HighIdsDoubledEmbedding(nn.Embedding):
    """c·W[ids] on the planning probe (ids below 16) but not on real batches: caught by the per-call check."""

    def forward(self, ids):
        rows = super().forward(ids)
        return torch.where((ids >= 16)[..., None], 2 * rows, rows)


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


class ChannelMixingNorm(nn.Module):
    """Named like a norm, 1-D weight, but every channel depends on all of the weight: the check rejects it."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.weight + x.roll(1, -1) * self.weight.roll(1, 0) * 0.5


class Gate(nn.Module):
    """Channel-wise, and not called *Norm: the channelwise rule measures it."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, width))

    def forward(self, x):
        return torch.tanh(x) * self.weight + self.bias


class CustomLM(nn.Module):
    def __init__(self, embedding: type[nn.Embedding]):
        super().__init__()
        torch.manual_seed(0)
        self.embed = embedding(VOCAB, 16)
        self.proj = DoubledLinear(16, 16)
        self.norm = ChannelMixingNorm(16)
        self.gate = Gate(16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.proj(self.norm(h)))
        return CausalLMOutput(logits=self.head(self.gate(h)))


@pytest.mark.parametrize(
    ("embedding", "planned"),
    [(TimesThreeEmbedding, "embedding"), (NormalisedEmbedding, "generic"), (HighIdsDoubledEmbedding, "embedding")],
)
def test_subclasses_never_get_a_wrong_fast_rule(embedding, planned):
    model = CustomLM(embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = {u.parameter: u.rule for u in plan_per_sample_grad_norms(model, "all").uses}
    assert plan["embed.weight"] == planned
    assert plan["proj.weight"] == "generic" and plan["proj.bias"] == "channelwise"  # a bias: checked, it holds
    assert plan["norm.weight"] == "channelwise" and plan["gate.weight"] == plan["gate.bias"] == "channelwise"
    batch = make_batch("left")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = per_sample_grad_norms(model, *batch, params="all")
    fallbacks = " ".join(str(w.message) for w in caught if "does not compute" in str(w.message) or
                         "do not compute" in str(w.message))
    assert "norm.weight" in fallbacks and "ChannelMixingNorm" in fallbacks  # caught by the per-call check
    assert ("embed.weight" in fallbacks) == (embedding is HighIdsDoubledEmbedding)
    assert "gate." not in fallbacks and "proj.bias" not in fallbacks
    assert max_rel_err(got, reference_norms(model, *batch, everything)) < 1e-4


def test_scaled_embedding_uses_its_scale_on_the_fast_path(monkeypatch):
    """Gemma's scaled embedding is measured by the embedding rule (with its scale), not the generic one."""
    import gvm_trl.grad_norms.recorder as recorder

    calls = []
    original = recorder.generic_records
    monkeypatch.setattr(recorder, "generic_records", lambda *a: calls.append(a[0].module) or original(*a))
    model = tiny("gemma2")
    batch = make_batch("left")
    got = per_sample_grad_norms(model, *batch, params="embed_tokens")  # tied: embedding and head uses
    assert calls == []
    assert max_rel_err(got, reference(model, batch, lambda n: "embed_tokens" in n)) < 1e-4


class BatchMeanShift(nn.Module):
    """Adds p times the batch mean: samples are not independent, so no per-sample gradient exists to measure."""

    def __init__(self, width):
        super().__init__()
        self.shift = nn.Parameter(torch.ones(width, width) * 0.1)

    def forward(self, x):
        return x + x.mean(0, keepdim=True) @ self.shift


def test_module_mixing_samples_is_refused():
    model = CustomLM(nn.Embedding)
    model.norm = BatchMeanShift(16)
    refused = r"could not reproduce the output of BatchMeanShift.*narrow gvm_grad_params"
    with pytest.raises(RuntimeError, match=refused):
        per_sample_grad_norms(model, *make_batch(), params=r"norm\.", setting="gvm_grad_params")


def test_errors_name_the_setting():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"^gvm_grad_params='nothing_here' selects no parameter"):
        plan_per_sample_grad_norms(model, "nothing_here", setting="gvm_grad_params")
    with pytest.raises(ValueError, match=r"^gvm_grad_params='lm_head\(' is neither"):
        plan_per_sample_grad_norms(model, "lm_head(", setting="gvm_grad_params")
    with pytest.raises(TypeError, match=r"^gvm_grad_params must be"):
        plan_per_sample_grad_norms(model, 3, setting="gvm_grad_params")
    with pytest.raises(ValueError, match=r"^gvm_grad_params='nothing_here' selects no parameter"):
        per_sample_grad_norms(model, *make_batch(), params="nothing_here", setting="gvm_grad_params")
    with pytest.raises(ValueError, match=r"^params='nothing_here'"):  # the default name
        per_sample_grad_norms(model, *make_batch(), params="nothing_here")


@pytest.mark.parametrize("shape", [(4, 4), (1, 5)])
@pytest.mark.parametrize("arch", ["qwen3_moe", "nemotron_h"])
def test_batch_size_equal_to_length_or_one(arch, shape):
    """Inputs are split into samples by their leading dimension: B == T and B == 1 must not confuse it."""
    rows, length = shape
    model = tiny(arch)
    batch = make_batch("right", (length,) * rows, tuple(1 + b % (length - 1) for b in range(rows)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = per_sample_grad_norms(model, *batch, params="all")
    assert max_rel_err(got, reference(model, batch)) < 1e-4
