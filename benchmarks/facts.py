"""The facts task: per-prompt facts at warm-started levels, with an EM objective computed exactly.

Each prompt asks for one fact: a key, one letter (``"?K"``), whose answer is a digit. A completion is two
tokens, a "rationale" character and then the answer, and it is accepted iff it is exactly two characters and the
second is the gold digit. So P(z | x) = Σ_r P(r | x) P(z | x, r) sums over the whole vocabulary for r, and the EM
objective of Theorem 4, L(θ) = −(1/m) Σ_i ln P(z_i | x_i, θ), is computed exactly from two batched forwards (no
sampling). Each fact has one right rationale r*_i ∈ "wxyz": the others give the gold digit 10× less often, so the
posterior over rationales Q(r | x, z) ∝ P(r | x) P(z | x, r) is neither uniform nor a point mass.

Before RL a tiny Llama is distilled onto target distributions that set each fact's starting accept rate p_i: a share
`never_share` of facts at p ≈ 0 (the gold digit gets no target mass), the others log-uniform in [`low`, `high`] (by
default 0.02 to 0.98; a never-solved fact's gold digit is also pushed below e^−12 ≈ 6e-6 per rationale by a hinge
on its log-probability, so it stays unsolved at any budget here). With u solving u² + δu(1 − u) = p_i (δ = 0.1):
P(r* | x) = u, the other three rationales share 1 − u, P(z | x, r*) = u and P(z | x, r ≠ r*) = δu, the rest of each
answer distribution spread over the other digits. The facts are independent (random keys, digits and rationales;
each key is one token, so each fact has its own embedding row), so each prompt learns at its own pace from its own
samples and L(θ) falls gradually, unlike the letter task's single shared rule. They still share the rest of the
network: learning some facts moves the others, and a fact whose samples are rarely accepted can lose probability
meanwhile (at learning rate 1e-3, several rare facts fell from p ≈ 0.03 to ~1e-4 within 30 steps under every method,
one seed; the default 1e-4 keeps L falling).

The few-revisit regime of issue 17 (`convergence.py --task facts-many`) needs ≥ 1,000 prompts, more than there are
one-token keys: `make_facts(..., key_length=2, families=True)` gives up to 48² facts with two-character keys, the
first character fixing answer and right rationale, the last the starting level, so facts share parameters and a
prompt's accept rate drifts between its visits. Its warm start fits minibatches (`warm_started_policy(batch_size=)`).

Held-out prompts ask the same facts in another phrasing (``"!K"``), warm-started to the same levels; RL only ever
sees the ``?`` phrasing, so held-out accuracy (also exact: the mean of P(z | x) at temperature 1) measures how far
what was learned transfers.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch

RATIONALES = "wxyz"
DIGITS = "0123456789"
KEYS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuv"  # one token each: a fact's own embedding row
TRAIN_PHRASING, HELDOUT_PHRASING = "?", "!"
WRONG_RATIONALE_FACTOR = 0.1  # δ: P(z | x, r ≠ r*) / P(z | x, r*)
NEVER_LOG_PROB = -12.0  # a never-solved fact's warm start holds ln P(z | x, r) at or below this, so p_i < 1e-5
COMPLETION_TOKENS = 2
SOLVED_LOW, SOLVED_HIGH = 0.95, 0.99  # the levels of the nearly-solved facts (`make_facts(solved_share=)`)


@dataclass(frozen=True)
class Fact:
    key: str
    answer: str
    rationale: str
    start_rate: float  # the accept rate the warm start aims at (0 for a never-solved fact)


def make_facts(count: int, seed: int, never_share: float = 0.125, low: float = 0.02, high: float = 0.98,
               key_length: int = 1, families: bool = False, solved_share: float = 0.0) -> list[Fact]:
    """`count` facts with distinct keys of `key_length` characters of KEYS (at most len(KEYS)**key_length facts); a
    share `never_share` of them is never solved, a share `solved_share` nearly solved (warm-started log-uniformly at
    SOLVED_LOW-SOLVED_HIGH, 0.95-0.99: the all-correct groups of real runs), the others log-uniform at `low`-`high`.
    With `solved_share` 0 (the default) the draws are those of the original task, fact for fact.

    `key_length` 1 (the default) gives each fact its own key token. With longer keys (the few-revisit task: ≥ 1,000
    facts) facts share key tokens, so their parameters overlap, and each fact's answer, rationale and level are drawn
    independently, as for one-character keys (the hidden-64 or -128 tiny Llama does not fit 1,024 such facts to their
    levels in CPU-minutes: after 1,500 warm-start steps of 128 prompts the measured and intended levels correlated at
    0.08). `families` (key_length ≥ 2 only) factorises the facts instead: the key's
    first character fixes the answer and the right rationale, its last character the starting level (the levels, the
    never-solved share included, are dealt to the characters). A fact is then learnable from its two characters'
    embeddings, and what RL teaches one fact moves every fact sharing a character with it: p_i drifts between visits.
    """
    if key_length < 1:
        raise ValueError(f"key_length must be >= 1, got {key_length}")
    if families and key_length < 2:
        raise ValueError("families needs key_length >= 2 (a family is the facts that share a key's first character)")
    capacity = len(KEYS) ** key_length
    if count > capacity:
        raise ValueError(f"the facts task has {capacity} keys of {key_length} characters, asked for {count} facts")
    rng = random.Random(seed)
    if key_length == 1:
        keys = rng.sample(KEYS, count)  # the draws of the original task, so its results stay reproducible
    else:
        keys = ["".join(KEYS[(index // len(KEYS) ** j) % len(KEYS)] for j in reversed(range(key_length)))
                for index in rng.sample(range(capacity), count)]
    rates = _levels(len(KEYS) if families else count, never_share, low, high, solved_share)
    rng.shuffle(rates)
    if not families:
        return [Fact(key, rng.choice(DIGITS), rng.choice(RATIONALES), rate) for key, rate in zip(keys, rates)]
    family = {first: (rng.choice(DIGITS), rng.choice(RATIONALES)) for first in KEYS}
    level = dict(zip(KEYS, rates))
    return [Fact(key, *family[key[0]], level[key[-1]]) for key in keys]


def _levels(count: int, never_share: float, low: float, high: float, solved_share: float = 0.0) -> list[float]:
    """A share `never_share` of zeros, a share `solved_share` log-uniform from SOLVED_LOW to SOLVED_HIGH, the others
    log-uniform from `low` to `high` (sorted within each group; with `solved_share` 0 exactly the original levels)."""
    never, solved = round(never_share * count), round(solved_share * count)
    if not 0 <= never_share <= 1 or not 0 <= solved_share <= 1 or never + solved > count:
        raise ValueError(f"never_share {never_share} and solved_share {solved_share} must be shares summing to <= 1")
    return ([0.0] * never + _log_uniform(count - never - solved, low, high)
            + _log_uniform(solved, SOLVED_LOW, SOLVED_HIGH))


def _log_uniform(count: int, low: float, high: float) -> list[float]:
    return [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / max(count - 1, 1)) for i in range(count)]


def question(fact: Fact, phrasing: str = TRAIN_PHRASING) -> str:
    return f"{phrasing}{fact.key}"


def conversation(fact: Fact, phrasing: str = TRAIN_PHRASING) -> list[dict]:
    return [{"role": "user", "content": question(fact, phrasing)}]


def facts_dataset(facts: list[Fact], phrasing: str = TRAIN_PHRASING):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": conversation(f, phrasing), "answer": f.answer} for f in facts])


def is_accepted(text: str, answer: str) -> bool:
    return len(text) == COMPLETION_TOKENS and text[1] == answer


def fact_reward(completions, answer, **kwargs) -> list[float]:
    """1 iff the completion is a rationale character followed by the gold digit (the dataset's ``answer``)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_accepted(text, gold)) for text, gold in zip(texts, answer)]


# -- the warm start ---------------------------------------------------------------------------------------------------


def rationale_level(rate: float) -> float:
    """u with u² + δu(1 − u) = rate: P(r* | x) = P(z | x, r*) = u gives accept rate `rate`."""
    d = WRONG_RATIONALE_FACTOR
    return (-d + math.sqrt(d * d + 4 * (1 - d) * rate)) / (2 * (1 - d))


def target_distributions(fact: Fact, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The warm start's targets: P(r | x) over the vocabulary [V], P(answer | x, r) for each r in RATIONALES [4, V]."""
    vocab = len(tokenizer)
    token = {c: tokenizer.convert_tokens_to_ids(c) for c in RATIONALES + DIGITS}
    u = rationale_level(fact.start_rate)
    first = torch.zeros(vocab)
    second = torch.zeros(len(RATIONALES), vocab)
    spread = 1 / len(RATIONALES) if fact.start_rate == 0 else None  # a never-solved fact has no preferred rationale
    for row, r in enumerate(RATIONALES):
        is_right = r == fact.rationale
        first[token[r]] = spread or (u if is_right else (1 - u) / (len(RATIONALES) - 1))
        gold = u if is_right else WRONG_RATIONALE_FACTOR * u
        for digit in DIGITS:
            second[row, token[digit]] = gold if digit == fact.answer else (1 - gold) / (len(DIGITS) - 1)
    return first, second


def encode_prompts(tokenizer, questions: list[str]) -> torch.Tensor:
    """Chat-templated prompts as one [n, length] tensor (every question has the same length in characters)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if len({len(row) for row in ids}) != 1:
        raise ValueError("the facts task needs prompts of one length")
    return torch.tensor(ids)


@functools.cache
def _warm_state(facts: tuple[Fact, ...], hidden_size: int, steps: int, seed: int,
                batch_size: int | None = None) -> dict[str, torch.Tensor]:
    from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, seed=seed, hidden_size=hidden_size)
    phrased = [(f, p) for p in (TRAIN_PHRASING, HELDOUT_PHRASING) for f in facts]
    prompts = encode_prompts(tokenizer, [question(f, p) for f, p in phrased])
    targets = [target_distributions(f, tokenizer) for f, _ in phrased]
    first_targets = torch.stack([t[0] for t in targets])  # [n, V]
    second_targets = torch.cat([t[1] for t in targets])  # [n·4, V]
    rationale_ids = torch.tensor([tokenizer.convert_tokens_to_ids(r) for r in RATIONALES])
    with_rationale = torch.cat([prompts.repeat_interleave(len(RATIONALES), 0),
                                rationale_ids.repeat(len(prompts))[:, None]], dim=1)
    rationale_weight = first_targets[:, rationale_ids].flatten()  # each rationale's answer loss counts by P(r | x)
    gold_ids = torch.tensor([tokenizer.convert_tokens_to_ids(f.answer) for f, _ in phrased]).repeat_interleave(
        len(RATIONALES))
    never = torch.tensor([f.start_rate == 0 for f, _ in phrased]).repeat_interleave(len(RATIONALES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    if batch_size is None:  # every prompt every step: the original task, bit for bit
        for _ in range(steps):
            first_logp = torch.log_softmax(model(input_ids=prompts).logits[:, -1].float(), dim=-1)
            second_logp = torch.log_softmax(model(input_ids=with_rationale).logits[:, -1].float(), dim=-1)
            loss = -(first_targets * first_logp).sum(-1).mean()
            loss = loss - (rationale_weight * (second_targets * second_logp).sum(-1)).sum() / len(prompts)
            gold_logp = second_logp.gather(1, gold_ids[:, None])[:, 0]
            loss = loss + torch.relu(gold_logp[never] - NEVER_LOG_PROB).sum() / len(prompts)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {name: value.detach().clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):  # the same loss on `batch_size` prompts a step, a fresh permutation each epoch
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(prompts), generator=generator)])
        chosen, order = order[:batch_size], order[batch_size:]
        rows = (chosen[:, None] * len(RATIONALES) + torch.arange(len(RATIONALES))).flatten()
        first_logp = torch.log_softmax(model(input_ids=prompts[chosen], logits_to_keep=1).logits[:, -1].float(), -1)
        second_logp = torch.log_softmax(model(input_ids=with_rationale[rows], logits_to_keep=1).logits[:, -1].float(),
                                        -1)
        loss = -(first_targets[chosen] * first_logp).sum(-1).mean()
        loss = loss - (rationale_weight[rows] * (second_targets[rows] * second_logp).sum(-1)).sum() / len(chosen)
        gold_logp = second_logp.gather(1, gold_ids[rows, None])[:, 0]
        loss = loss + torch.relu(gold_logp[never[rows]] - NEVER_LOG_PROB).sum() / len(chosen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def warm_started_policy(facts: list[Fact], hidden_size: int = 64, steps: int = 1500, seed: int = 0,
                        batch_size: int | None = None):
    """(model, tokenizer): a tiny Llama distilled onto the facts' starting levels (computed once per process).

    `batch_size` None (the original task) fits every prompt every step; a number fits that many prompts a step (each
    epoch a fresh seeded permutation) and computes only the last position's logits, which the few-revisit task needs
    to warm-start 1,024 facts in CPU-minutes.
    """
    from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

    tokenizer = make_char_tokenizer()
    model = make_tiny_llama(tokenizer, seed=seed, hidden_size=hidden_size)
    model.load_state_dict(_disk_cached_warm_state(tuple(facts), hidden_size, steps, seed, batch_size))
    return model, tokenizer


WARM_CACHE_ENV = "GVM_FACTS_WARM_CACHE"


def _disk_cached_warm_state(facts: tuple[Fact, ...], hidden_size: int, steps: int, seed: int,
                            batch_size: int | None) -> dict[str, torch.Tensor]:
    """`_warm_state`, kept on disk across processes when the environment names a folder (GVM_FACTS_WARM_CACHE): a
    sweep of one task over several processes (one per learning rate) then distils each seed's warm start once. The
    file is keyed by everything the warm start reads (the facts, sizes, steps, seed, batch, torch version) and holds
    the tensors exactly (torch.save), so a run from the cache starts from the same weights bit for bit."""
    import hashlib
    import os

    folder = os.environ.get(WARM_CACHE_ENV)
    if not folder:
        return _warm_state(facts, hidden_size, steps, seed, batch_size)
    key = hashlib.sha256(repr((facts, hidden_size, steps, seed, batch_size, torch.__version__)).encode()).hexdigest()
    path = os.path.join(folder, f"facts_warm_{key[:24]}.pt")
    if os.path.exists(path):
        return torch.load(path)
    state = _warm_state(facts, hidden_size, steps, seed, batch_size)
    os.makedirs(folder, exist_ok=True)
    torch.save(state, path + f".{os.getpid()}.tmp")
    os.replace(path + f".{os.getpid()}.tmp", path)  # atomic: a reader never sees half a file
    return state


# -- the exact objective ----------------------------------------------------------------------------------------------


@functools.cache
def _acceptance_table(vocab: int, answer: str) -> torch.Tensor:
    """A[t1, t2] = 1 iff generating t1 then t2 is accepted (decoded as the trainer decodes; t1 = EOS ends it)."""
    from gvm_trl.testing import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    pairs = [[t1, t2] if t1 != tokenizer.eos_token_id else [t1] for t1 in range(vocab) for t2 in range(vocab)]
    texts = tokenizer.batch_decode(pairs, skip_special_tokens=True)
    return torch.tensor([is_accepted(text, answer) for text in texts], dtype=torch.float64).view(vocab, vocab)


@torch.no_grad()
def accept_probabilities(model, tokenizer, facts: list[Fact], phrasing: str = TRAIN_PHRASING,
                         batch_size: int = 64, last_logits_only: bool = False) -> torch.Tensor:
    """P(z_i | x_i) for each fact: Σ_{t1, t2} P(t1 | x) P(t2 | x, t1) A_z[t1, t2], in float64.

    `last_logits_only` computes only the last position's logits (the same values up to float rounding, ~2.5× faster;
    the few-revisit task's 1,024 facts need it; the original task keeps its bit-for-bit numbers without it).
    """
    keep = {"logits_to_keep": 1} if last_logits_only else {}
    was_training = model.training
    model.eval()
    vocab = len(tokenizer)
    out = []
    try:
        for start in range(0, len(facts), batch_size):
            chunk = facts[start : start + batch_size]
            prompts = encode_prompts(tokenizer, [question(f, phrasing) for f in chunk]).to(model.device)
            first = torch.softmax(model(input_ids=prompts, **keep).logits[:, -1].double(), dim=-1)  # [n, V]
            extended = torch.cat([prompts.repeat_interleave(vocab, 0),
                                  torch.arange(vocab, device=model.device).repeat(len(chunk))[:, None]], dim=1)
            second = torch.softmax(model(input_ids=extended, **keep).logits[:, -1].double(), dim=-1)
            second = second.view(len(chunk), vocab, vocab)
            for fact, p1, p2 in zip(chunk, first.cpu(), second.cpu()):
                out.append(float((p1[:, None] * p2 * _acceptance_table(vocab, fact.answer)).sum()))
    finally:
        model.train(was_training)
    return torch.tensor(out, dtype=torch.float64)


def em_objective(rates: torch.Tensor, floor: float = 1e-12) -> float:
    """L = −(1/m) Σ_i ln P(z_i | x_i) (each rate floored at `floor`, so a never-solved fact stays finite)."""
    return float(-torch.log(rates.clamp(min=floor)).mean())
