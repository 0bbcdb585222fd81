"""The methods this package trains, by name: one table read by `examples/train.py` and every benchmark.

A method is a trainer, its config class and the `gvm_*` settings that make it that method. The baselines are the
vanilla algorithms run through the same code: uniform allocation (one generation round, no probes, no gradient-norm
pass) and no per-prompt weight, so ``"grpo"`` computes what `trl.GRPOTrainer` computes and ``"raft"`` is RAFT++.
A GVM number is compared fairly against the baseline with the same weighting: ``"grpo-mean"``/``"raft-mean"``
(uniform allocation, Algorithm 1's 1/|D_i|, GVM's default). The history-only peers ``"dynamic-*"`` (DAPO's dynamic
sampling) and ``"knapsack-*"`` (Knapsack RL) use GVM's probes, history and weighting but not Theorem 3;
``"reinforce-ada-*"`` (Reinforce-Ada) samples in rounds and trains unweighted fixed-size groups; and
``"gvm-*-paper"`` is the paper's exact protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import GVMGRPOConfig, GVMRAFTConfig
from .trainer import GVMGRPOTrainer, GVMRAFTTrainer

__all__ = ["METHODS", "Method", "method"]


@dataclass(frozen=True)
class Method:
    """A named training method: which trainer and config, and the settings it fixes."""

    name: str
    trainer_cls: type
    config_cls: type
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def is_gvm(self) -> bool:
        return self.settings.get("gvm_allocation", "gvm") == "gvm"

    def config(self, **fields: Any):
        """The config with this method's settings; a field that contradicts them is refused by name."""
        for name, value in self.settings.items():
            if name in fields and fields[name] != value:
                raise ValueError(f"Method {self.name!r} fixes {name}={value!r}; drop {name}={fields[name]!r}.")
        return self.config_cls(**{**fields, **self.settings})


_VANILLA = {"gvm_allocation": "uniform", "gvm_weighting": "none"}
_PAPER = {"gvm_allocation": "gvm", "gvm_weighting": "lemma1", "gvm_history_decay": 0.0, "gvm_probe_ahead": False}


def _family(algorithm: str, label: str, trainer_cls: type, config_cls: type, vanilla_note: str) -> list[Method]:
    """The same methods for each trainer, so that GRPO's and RAFT++'s tables cannot drift apart."""
    rows = [
        (f"gvm-{algorithm}", {"gvm_allocation": "gvm"},
         f"GVM-{label}: Theorem 3 allocation, Lemma 1 weights from the pooled estimate (gvm_weighting='mean')"),
        (algorithm, _VANILLA, f"{label}: uniform, unweighted{vanilla_note}"),
        (f"{algorithm}-mean", {"gvm_allocation": "uniform", "gvm_weighting": "mean"},
         f"{label} with Algorithm 1's 1/|D_i|: uniform allocation, GVM's default weighting (the fair baseline for "
         f"gvm-{algorithm})"),
        (f"dynamic-{algorithm}", {"gvm_allocation": "dynamic"},
         f"{label} with DAPO's dynamic sampling: probes and history as gvm-{algorithm}, all-correct/all-wrong prompts "
         "get nothing, the rest share the budget equally"),
        (f"knapsack-{algorithm}", {"gvm_allocation": "knapsack"},
         f"{label} with Knapsack RL's budgets from the same probes and history"),
        (f"gvm-{algorithm}-unweighted", {"gvm_allocation": "gvm", "gvm_weighting": "none"},
         f"GVM-{label} allocation without Lemma 1 weights (how the official code trains)"),
        (f"reinforce-ada-{algorithm}", {"gvm_allocation": "reinforce-ada", "gvm_weighting": "none"},
         f"{label} with Reinforce-Ada's adaptive rounds (balanced exit, 8 per round, at most 4 rounds, groups of "
         "num_generations rows) and its unweighted loss: fair against the unweighted uniform baseline"),
        (f"gvm-{algorithm}-paper", _PAPER,
         f"GVM-{label} as the paper states it: a probe round before each allocation, estimates from the probes "
         "alone, Lemma 1's 1/(n_i p_i)"),
    ]
    return [Method(name, trainer_cls, config_cls, settings, description) for name, settings, description in rows]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *_family("raft", "RAFT++", GVMRAFTTrainer, GVMRAFTConfig, ""),
        *_family("grpo", "GRPO", GVMGRPOTrainer, GVMGRPOConfig, " (= trl.GRPOTrainer)"),
    )
}


def method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the names there are."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
