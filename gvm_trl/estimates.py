"""Per-prompt estimates of the accept rate p_i and gradient norm G_i that survive few probes.

With N′ = 4 probes a prompt with p = 0.02 shows no accepted probe 92 % of the time, and Theorem 3 then gives it
nothing. :class:`PromptHistory` keeps, per training prompt, a decayed record of every visit — completions scored,
completions accepted, and the gradient norms measured on accepted probes — and combines it with the current probes:

    p̃_i = (λ·A_i + a_i) / (λ·T_i + t_i),        G̃_i = (λ·S_i + s_i) / (λ·C_i + c_i),

where (t_i, a_i) are this visit's probes and accepted probes, s_i / c_i the sum / count of their measured norms,
capital letters the history and λ ∈ (0, 1] the decay applied per visit. p̃_i is the mean of the Beta posterior of p_i
under the improper Beta(0, 0) prior with decayed counts (as MoPPS, arXiv 2507.04632, decays its Beta counts), so a
prompt never solved on any visit keeps p̃ = 0 — it is told apart from a rare one, whose past successes keep p̃ > 0
and its past G in the estimate. After the batch, its phase-2 completions join the record (:meth:`record`), so the
next visit also learns from them.

Every input is a global (gathered) quantity and the arithmetic is plain Python in a fixed order, so every process
holds the same history; it is saved with each checkpoint (:meth:`state_dict`).

:func:`optimistic_rates` is a lever against the starvation bias (issue 17): a prompt with no accepted probe gets p̃ = 0
and Theorem 3 gives it nothing, although its posterior still puts mass on p > 0. It replaces those zeros by a quantile
of, or a Thompson draw from, that posterior. :func:`pooled_rates` is the other: a Beta prior fitted to the batch.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass
from typing import Iterable

from .validation import as_nonnegative

__all__ = ["PromptEvidence", "PromptHistory", "optimistic_rates", "pooled_rates"]


@dataclass
class PromptEvidence:
    """What one visit observed about each of its prompts (all lists have one entry per prompt)."""

    keys: list[int]
    trials: list[float]
    accepted: list[float]
    norm_sums: list[float]
    norm_counts: list[float]

    def __post_init__(self) -> None:
        lengths = {len(self.keys), len(self.trials), len(self.accepted), len(self.norm_sums), len(self.norm_counts)}
        if len(lengths) != 1:
            raise ValueError("PromptEvidence needs one entry per prompt in every field.")

    def estimates(self) -> tuple[list[float], list[float]]:
        """(p_i, G_i) from these counts alone: accepted / trials and the mean measured norm (0 where none)."""
        rates = [a / t if t > 0 else 0.0 for a, t in zip(self.accepted, self.trials)]
        norms = [s / c if c > 0 else 0.0 for s, c in zip(self.norm_sums, self.norm_counts)]
        return rates, norms


class PromptHistory:
    """Decayed per-prompt counts ``[trials, accepted, norm_sum, norm_count]``, keyed by the prompt's dataset index."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.decay = decay
        self._records: dict[int, list[float]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: int) -> bool:
        return key in self._records

    def _decayed(self, key: int) -> list[float]:
        return [self.decay * value for value in self._records.get(key, (0.0, 0.0, 0.0, 0.0))]

    def combined(self, evidence: PromptEvidence) -> PromptEvidence:
        """The history's decayed counts plus this visit's evidence, per prompt; the history is not changed."""
        totals = [
            [past + new for past, new in zip(self._decayed(key), values)]
            for key, *values in zip(
                evidence.keys, evidence.trials, evidence.accepted, evidence.norm_sums, evidence.norm_counts
            )
        ]
        return PromptEvidence(list(evidence.keys), *(list(column) for column in zip(*totals))) if totals else evidence

    def estimates(self, evidence: PromptEvidence) -> tuple[list[float], list[float]]:
        """(p̃_i, G̃_i) from the history and this visit's evidence; the history is not changed."""
        return self.combined(evidence).estimates()

    def record(self, evidence: PromptEvidence) -> None:
        """Fold one visit's evidence into the history (decaying what was there)."""
        for key, *values in zip(
            evidence.keys, evidence.trials, evidence.accepted, evidence.norm_sums, evidence.norm_counts
        ):
            self._records[key] = [past + new for past, new in zip(self._decayed(key), values)]

    def state_dict(self) -> dict:
        return {"decay": self.decay, "prompts": {str(key): values for key, values in sorted(self._records.items())}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("decay") != self.decay:
            raise ValueError(
                f"The checkpoint's prompt history was kept with gvm_history_decay={state.get('decay')}, this run uses "
                f"{self.decay}: resume with the same setting."
            )
        self._records = {int(key): [float(v) for v in values] for key, values in state["prompts"].items()}


def optimistic_rates(
    accepted: Iterable[float],
    trials: Iterable[float],
    *,
    rule: str = "quantile",
    quantile: float = 0.5,
    prior_failures: float = 1.0,
    seed: int | None = None,
) -> list[float]:
    """Accept rates with a posterior-uncertainty floor where nothing was accepted.

    Where a_i > 0 the rate is the plain estimate a_i / t_i. Where a_i = 0 (possibly decayed history counts, so a_i and
    t_i may be fractional), p_i's posterior under a Beta(1, b₀) prior (``prior_failures`` = b₀; b₀ = 1 is uniform)
    after t_i failures is Beta(1, b₀ + t_i), whose CDF is F(x) = 1 − (1 − x)^(b₀ + t_i). The rate becomes

    - ``rule="quantile"``: its ``quantile`` q, F⁻¹(q) = 1 − (1 − q)^(1/(b₀ + t_i)) (q = 0.5: the posterior median, e.g.
      0.129 after 4 failed probes; a larger q is an upper confidence bound, as UCB uses);
    - ``rule="thompson"``: a draw F⁻¹(u_i) with u_i uniform on [0, 1) from ``random.Random(seed)``, one u per prompt in
      index order whatever the counts (MoPPS, arXiv 2507.04632, samples its Beta posteriors the same way). Pass the
      same seed on every process (e.g. derived from the global step) so that every process draws the same rates.

    Theorem 3 also needs G_i for such a prompt (its measured G_i is 0): the caller supplies one (the history's, the
    batch mean, or 1 for "Theorem 3 with G_i ≡ 1").
    """
    accepted_, trials_ = _checked_counts(accepted, trials)
    if rule not in ("quantile", "thompson"):
        raise ValueError(f"rule must be 'quantile' or 'thompson', got {rule!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile!r}")
    if (isinstance(prior_failures, bool) or not isinstance(prior_failures, numbers.Real)
            or not (math.isfinite(prior_failures) and prior_failures > 0.0)):
        raise ValueError(f"prior_failures must be finite and > 0, got {prior_failures!r}")
    if rule == "thompson":
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"rule='thompson' needs an integer seed, the same on every process; got {seed!r}")
        generator = random.Random(int(seed))
        levels = [generator.random() for _ in accepted_]
    else:
        levels = [float(quantile)] * len(accepted_)
    rates = []
    for a, t, level in zip(accepted_, trials_, levels):
        if a > 0.0:
            rates.append(a / t)
        else:
            rates.append(1.0 - (1.0 - level) ** (1.0 / (prior_failures + t)))
    return rates


def pooled_rates(accepted: Iterable[float], trials: Iterable[float]) -> list[float]:
    """Accept rates shrunk towards the batch: the posterior means under a Beta(κm, κ(1 − m)) prior fitted to the
    batch's prompts by the method of moments (empirical Bayes, as in the beta-binomial model).

    m = Σa_i / Σt_i; the spread of the true rates is the variance of the plain estimates a_i / t_i less their mean
    binomial noise m(1 − m)/t_i, and κ = m(1 − m)/spread − 1 (the prior's pseudo-count). The rate of prompt i is then
    (a_i + κm) / (t_i + κ): a prompt with nothing accepted keeps a rate above 0 that shrinks as its own failures
    (t_i) grow against κ. Where the estimates spread no more than noise would (spread ≤ 0, or one prompt) every
    prompt gets m; where nothing or everything was accepted, the plain estimates are returned. Hand-written: the
    dependencies have no beta-binomial fit, and a few lines of moments are all it takes.
    """
    accepted_, trials_ = _checked_counts(accepted, trials)
    seen = [(a, t) for a, t in zip(accepted_, trials_) if t > 0]
    total_a, total_t = sum(a for a, _ in seen), sum(t for _, t in seen)
    plain = [a / t if t > 0 else 0.0 for a, t in zip(accepted_, trials_)]
    if not seen or total_a in (0.0, total_t):
        return plain
    m = total_a / total_t
    rates = [a / t for a, t in seen]
    spread = sum((r - m) ** 2 for r in rates) / len(rates) - sum(m * (1 - m) / t for _, t in seen) / len(seen)
    if len(seen) < 2 or spread <= 0:
        return [m if t > 0 else 0.0 for t in trials_]
    kappa = max(m * (1 - m) / spread - 1.0, 0.0)
    return [(a + kappa * m) / (t + kappa) if t > 0 else 0.0 for a, t in zip(accepted_, trials_)]


def _checked_counts(accepted: Iterable[float], trials: Iterable[float]) -> tuple[list[float], list[float]]:
    """Per-prompt (accepted, trials) counts as floats: finite, non-negative, as many of each, none accepted > tried."""
    accepted_ = as_nonnegative(accepted, "accepted")
    trials_ = as_nonnegative(trials, "trials")
    if len(accepted_) != len(trials_):
        raise ValueError(f"lengths differ: accepted has {len(accepted_)}, trials has {len(trials_)}")
    for index, (a, t) in enumerate(zip(accepted_, trials_)):
        if a > t:
            raise ValueError(f"accepted[{index}] = {a} exceeds trials[{index}] = {t}")
    return accepted_, trials_
