"""Pieces shared by the benchmark scripts: methods and their variants, policies, trainer settings, statistics, output.

Import it before torch (it sets the thread and tokenizer environment first): ``from common import ...`` from a
script in this folder.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import ast  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANDOM_QWEN2 = "random-qwen2-0.5b"


def limit_threads(device: str, threads: int = 1) -> None:
    """`threads` threads on a shared CPU unless GVM_BENCH_THREADS says otherwise; GPU runs are left alone."""
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("GVM_BENCH_THREADS", str(threads))))


# -- methods and variants ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodRun:
    """A method of `gvm_trl.methods.METHODS` under a label, with extra config fields (a variant when non-empty)."""

    label: str
    base: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self):
        from gvm_trl.methods import method

        return method(self.base)

    @property
    def settings(self) -> dict[str, Any]:
        return {**self.method.settings, **self.fields}

    @property
    def is_gvm(self) -> bool:
        """Whether the run probes and plans (Theorem 3 or a history-only peer), rather than splitting uniformly."""
        return self.settings.get("gvm_allocation", "gvm") != "uniform"

    @property
    def weighting(self) -> str:
        return self.settings.get("gvm_weighting", "mean")

    @property
    def trainer_cls(self) -> type:
        return self.method.trainer_cls

    def config(self, **fields: Any):
        return self.method.config(**{**fields, **self.fields})

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{self.base} ({extra})" if extra else self.base


def parse_value(text: str) -> Any:
    """A Python literal (0.8, 2, None, True, 'mean') or, failing that, the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(spec: str) -> MethodRun:
    """``LABEL=BASE:field=value[,field=value...]``, e.g. ``gvm-raft-mean=gvm-raft:gvm_weighting=mean``.

    BASE is a name of `gvm_trl.methods.METHODS`; every field must be a field of its config class in the installed
    gvm_trl (a field it does not have yet is refused here, before anything trains).
    """
    from gvm_trl.methods import METHODS

    label, equals, rest = spec.partition("=")
    base, colon, assignments = rest.partition(":")
    if not equals or not label or not base:
        raise ValueError(f"--variant {spec!r}: expected LABEL=BASE:field=value[,field=value...]")
    if base not in METHODS:
        raise ValueError(f"--variant {spec!r}: unknown method {base!r}; choose one of {', '.join(METHODS)}")
    if label in METHODS:
        raise ValueError(f"--variant {spec!r}: {label!r} is already a method's name; pick another label")
    known = {f.name for f in dataclasses.fields(METHODS[base].config_cls)}
    fields = {}
    for assignment in filter(None, assignments.split(",")) if colon else ():
        name, eq, value = assignment.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"--variant {spec!r}: {assignment!r} is not field=value")
        if name not in known:
            raise ValueError(f"--variant {spec!r}: {METHODS[base].config_cls.__name__} has no field {name!r} in this "
                             "installation of gvm_trl")
        fields[name] = parse_value(value.strip())
        fixed = METHODS[base].settings
        if name in fixed and fields[name] != fixed[name]:
            raise ValueError(f"--variant {spec!r}: {base} fixes {name}={fixed[name]!r}; start from another method")
    return MethodRun(label, base, fields)


def method_runs(names: Sequence[str], variants: Sequence[str] = ()) -> list[MethodRun]:
    """The methods named (plain METHODS names), then the variants, each once, in that order."""
    from gvm_trl.methods import method

    runs = [MethodRun(name, method(name).name) for name in names]
    for spec in variants:
        run = parse_variant(spec)
        if any(r.label == run.label for r in runs):
            raise ValueError(f"--variant {spec!r}: the label {run.label!r} is used twice")
        runs.append(run)
    return runs


def uniform_baseline(run: MethodRun, runs: Sequence[MethodRun]) -> MethodRun | None:
    """For a probing run, the fair baseline among `runs`: the plain uniform method of the same trainer with the same
    weighting (so that only the allocation differs); failing that, the unweighted one (vanilla GRPO / RAFT++).
    None for a uniform run, or when `runs` holds no uniform method of its trainer."""
    if not run.is_gvm:
        return None
    candidates = [o for o in runs if not o.is_gvm and not o.fields and o.trainer_cls is run.trainer_cls]
    same_weighting = [o for o in candidates if o.weighting == run.weighting]
    return (same_weighting or [o for o in candidates if o.weighting == "none"] or [None])[0]


# -- policies and trainer settings ------------------------------------------------------------------------------------


def load_policy(model: str, tiny: bool, device: str, seed: int = 0):
    """(model, tokenizer): the tiny random Llama of the tests, a random Qwen2-0.5B-shaped model, or a real model
    (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if tiny or model == RANDOM_QWEN2:
        from gvm_trl.testing import make_char_tokenizer, make_tiny_llama

        tokenizer = make_char_tokenizer()
        if tiny:
            return make_tiny_llama(tokenizer, seed=seed), tokenizer
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
        return Qwen2ForCausalLM(config).to(dtype), tokenizer
    from gvm_trl.models import load_model_and_tokenizer

    return load_model_and_tokenizer(model, dtype=dtype)


def reward_function(name: str):
    """`math` (the package's verifier on the gold `answer`) or the `parity` stand-in."""
    if name == "parity":
        from gvm_trl.testing import parity_reward

        return parity_reward
    from gvm_trl.rewards import math_reward

    return math_reward


def trainer_arguments(device: str, output_dir: str, seed: int, **overrides) -> dict:
    """Settings common to every trainer in the benchmarks (fp32 on CPU, bf16 on CUDA, no saving or reporting)."""
    options = dict(
        output_dir=output_dir,
        bf16=device == "cuda",
        gradient_checkpointing=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=1.0,
        beta=0.0,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return options


def completions_generated(rollout_totals: dict) -> int:
    """Every completion a trainer generated (probes included), whatever its `rollout_totals` calls the parts."""
    return int(sum(value for key, value in rollout_totals.items() if key.endswith("_completions")))


# -- statistics -------------------------------------------------------------------------------------------------------


def paired_bootstrap(per_seed: dict[str, Sequence], statistic: Callable[[dict[str, list]], float],
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` on the seeds, and its percentile interval over seeds resampled with
    replacement, the same seeds for every method (runs with one seed share data order and initial weights).

    `per_seed` maps a method to its per-seed values, all in one seed order. Infinite statistics (a target never
    reached) count as +inf in the percentiles.
    """
    count = len(next(iter(per_seed.values())))
    rng = np.random.default_rng(seed)
    estimate = statistic({k: list(v) for k, v in per_seed.items()})
    draws = []
    for _ in range(resamples):
        index = rng.integers(count, size=count)
        draws.append(statistic({k: [v[i] for i in index] for k, v in per_seed.items()}))
    draws = np.array(draws, dtype=float)
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail], method="inverted_cdf")
    return float(estimate), float(low), float(high)


def paired_bootstrap_many(per_seed: dict[str, Sequence], statistics: Callable[[dict[str, list]], Sequence[float]],
                          resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[tuple[float, float, float]]:
    """`paired_bootstrap` of several statistics computed together (one call per resample, e.g. every target of one
    pair of seed-mean curves): one (estimate, low, high) per statistic, on the same resampled seeds."""
    count = len(next(iter(per_seed.values())))
    rng = np.random.default_rng(seed)
    estimates = np.asarray(statistics({k: list(v) for k, v in per_seed.items()}), dtype=float)
    draws = []
    for _ in range(resamples):
        index = rng.integers(count, size=count)
        draws.append(statistics({k: [v[i] for i in index] for k, v in per_seed.items()}))
    tail = (1 - level) / 2
    low, high = np.quantile(np.array(draws, dtype=float), [tail, 1 - tail], axis=0, method="inverted_cdf")
    return [(float(e), float(lo), float(hi)) for e, lo, hi in zip(estimates, low, high)]


def format_interval(estimate: float, low: float, high: float, spec: str = ".2f") -> str:
    def one(x: float) -> str:
        return "∞" if math.isinf(x) else format(x, spec)

    return f"{one(estimate)} [{one(low)}, {one(high)}]"


# -- output -----------------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pyplot():
    """matplotlib.pyplot with the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, title: str | None = None) -> None:
    import textwrap

    if title:
        figure.suptitle(textwrap.fill(title, 120), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
