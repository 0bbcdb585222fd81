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
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PromptEvidence", "PromptHistory"]


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

    def estimates(self, evidence: PromptEvidence) -> tuple[list[float], list[float]]:
        """(p̃_i, G̃_i) from the history and this visit's evidence; the history is not changed."""
        rates, norms = [], []
        for key, trials, accepted, norm_sum, norm_count in zip(
            evidence.keys, evidence.trials, evidence.accepted, evidence.norm_sums, evidence.norm_counts
        ):
            past_trials, past_accepted, past_sum, past_count = self._decayed(key)
            total_trials, total_count = past_trials + trials, past_count + norm_count
            rates.append((past_accepted + accepted) / total_trials if total_trials > 0 else 0.0)
            norms.append((past_sum + norm_sum) / total_count if total_count > 0 else 0.0)
        return rates, norms

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
