"""The methods this package trains, by name: one table read by `examples/train.py` and every benchmark.

A method is a trainer, its config class and the `gvm_*` settings that make it that method. The baselines are the
vanilla algorithms run through the same code: uniform allocation (one generation round, no probes, no gradient-norm
pass) and no per-prompt weight, so ``"grpo"`` computes what `trl.GRPOTrainer` computes and ``"raft"`` is RAFT++.
A GVM number is compared fairly against the baseline with the same weighting: ``"grpo-mean"``/``"raft-mean"``
(uniform allocation, Algorithm 1's 1/|D_i|, GVM's default). The history-only peers ``"dynamic-*"`` (DAPO's dynamic
sampling) and ``"knapsack-*"`` (Knapsack RL) use GVM's probes, history and weighting but not Theorem 3, and
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

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gvm-raft", GVMRAFTTrainer, GVMRAFTConfig, {"gvm_allocation": "gvm"},
               "GVM-RAFT++: Theorem 3 allocation, Lemma 1 weights from the pooled estimate (gvm_weighting='mean')"),
        Method("raft", GVMRAFTTrainer, GVMRAFTConfig, _VANILLA, "RAFT++: uniform, unweighted"),
        Method("raft-mean", GVMRAFTTrainer, GVMRAFTConfig, {"gvm_allocation": "uniform", "gvm_weighting": "mean"},
               "RAFT++ with Algorithm 1's 1/|D_i|: uniform allocation, GVM's default weighting (the fair baseline "
               "for gvm-raft)"),
        Method("dynamic-raft", GVMRAFTTrainer, GVMRAFTConfig, {"gvm_allocation": "dynamic"},
               "RAFT++ with DAPO's dynamic sampling: probes and history as gvm-raft, all-correct/all-wrong prompts "
               "get nothing, the rest share the budget equally"),
        Method("knapsack-raft", GVMRAFTTrainer, GVMRAFTConfig, {"gvm_allocation": "knapsack"},
               "RAFT++ with Knapsack RL's budgets from the same probes and history"),
        Method("gvm-grpo", GVMGRPOTrainer, GVMGRPOConfig, {"gvm_allocation": "gvm"},
               "GVM-GRPO: Theorem 3 allocation, Lemma 1 weights from the pooled estimate"),
        Method("grpo", GVMGRPOTrainer, GVMGRPOConfig, _VANILLA, "GRPO: uniform, unweighted (= trl.GRPOTrainer)"),
        Method("grpo-mean", GVMGRPOTrainer, GVMGRPOConfig, {"gvm_allocation": "uniform", "gvm_weighting": "mean"},
               "GRPO with Algorithm 1's 1/|D_i|: uniform allocation, GVM's default weighting (the fair baseline for "
               "gvm-grpo)"),
        Method("dynamic-grpo", GVMGRPOTrainer, GVMGRPOConfig, {"gvm_allocation": "dynamic"},
               "GRPO with DAPO's dynamic sampling: probes and history as gvm-grpo, all-correct/all-wrong prompts get "
               "nothing, the rest share the budget equally"),
        Method("knapsack-grpo", GVMGRPOTrainer, GVMGRPOConfig, {"gvm_allocation": "knapsack"},
               "GRPO with Knapsack RL's budgets from the same probes and history"),
        Method("gvm-raft-unweighted", GVMRAFTTrainer, GVMRAFTConfig,
               {"gvm_allocation": "gvm", "gvm_weighting": "none"},
               "GVM-RAFT++ allocation without Lemma 1 weights (how the official code trains)"),
        Method("gvm-grpo-unweighted", GVMGRPOTrainer, GVMGRPOConfig,
               {"gvm_allocation": "gvm", "gvm_weighting": "none"},
               "GVM-GRPO allocation without Lemma 1 weights"),
        Method("gvm-raft-paper", GVMRAFTTrainer, GVMRAFTConfig, _PAPER,
               "GVM-RAFT++ as the paper states it: a probe round before each allocation, estimates from the probes "
               "alone, Lemma 1's 1/(n_i p_i)"),
        Method("gvm-grpo-paper", GVMGRPOTrainer, GVMGRPOConfig, _PAPER,
               "GVM-GRPO as the paper states it: a probe round before each allocation, estimates from the probes "
               "alone, Lemma 1's 1/(n_i p_i)"),
    )
}


def method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the names there are."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.") from None
