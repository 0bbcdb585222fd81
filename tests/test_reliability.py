"""A run survives what users throw at it: a kill at any point of a checkpoint's save, torn files, infinite rewards and
datasets TRL would fail on late — each failure made to happen here, nothing lost and nothing silent."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch
import transformers.trainer as hf_trainer
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import gvm_trl.state as gvm_state
from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer
from gvm_trl.state import STATE_FILE
from test_trainer import graded_reward, make_trainer, prompt_dataset, read_allocations

from conftest import make_tiny_llama


# -- a kill at any point of a save ----------------------------------------------------------------------------------


class Killed(Exception):
    """What the injected failure raises (the test's stand-in for SIGKILL at that point)."""


# The writes of one checkpoint save, in the order Trainer and the GVM trainer make them.
SAVE_WRITES = [
    ("model", hf_trainer.Trainer, "save_model"),
    ("gvm_state", gvm_state, "write_atomically"),
    ("optimizer", hf_trainer.Trainer, "_save_optimizer_and_scheduler"),
    ("rng", hf_trainer.Trainer, "_save_rng_state"),
    ("trainer_state", hf_trainer.TrainerState, "save_to_json"),
    ("rotation", hf_trainer, "rotate_checkpoints"),
]


class SaveInjector(TrainerCallback):
    """Records the writes of the save at step `at`, failing just before the one named `kill_before` ("gvm_state.tmp":
    after the GVM state's temporary file is written, before it is renamed into place)."""

    def __init__(self, monkeypatch, at: int, kill_before: str | None = None):
        self.at, self.kill_before, self.armed, self.order = at, kill_before, False, []
        for name, owner, attribute in SAVE_WRITES:
            monkeypatch.setattr(owner, attribute, self._wrapped(name, getattr(owner, attribute)))

    def on_step_end(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.at

    def _wrapped(self, name, original):
        def write(*args, **kwargs):
            if self.armed and name == "gvm_state" and self.kill_before == "gvm_state.tmp":
                with open(f"{args[0]}.tmp", "w") as handle:
                    handle.write(args[1][: len(args[1]) // 2])
                raise Killed("gvm_state.tmp")
            if self.armed:
                if name == self.kill_before:
                    raise Killed(name)
                self.order.append(name)
            return original(*args, **kwargs)

        return write


def run_to_step_4(tmp_path, tokenizer, model_dir, callbacks=(), **options):
    options = dict(dict(save_strategy="steps", save_steps=2, save_total_limit=1, max_steps=4, gvm_probe_ahead=False,
                        gvm_history_decay=0.5), **options)
    trainer = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, tokenizer, model=str(model_dir),
                           dataset=prompt_dataset(8), **options)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


@pytest.fixture
def model_dir(tmp_path, char_tokenizer):
    path = tmp_path / "model"
    make_tiny_llama(char_tokenizer).save_pretrained(path)
    return path


def test_the_gvm_state_is_written_before_the_completeness_marker_the_hub_push_and_rotation(
        tmp_path, char_tokenizer, model_dir, monkeypatch):
    injector = SaveInjector(monkeypatch, at=4)
    run_to_step_4(tmp_path, char_tokenizer, model_dir, [injector]).train()
    assert injector.order == ["model", "gvm_state", "optimizer", "rng", "trainer_state", "rotation"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]


@pytest.mark.parametrize("kill_before", ["model", "gvm_state", "gvm_state.tmp", "optimizer", "rng", "trainer_state",
                                         "rotation"])
def test_a_kill_between_any_two_writes_of_a_save_resumes_exactly(kill_before, tmp_path, char_tokenizer, model_dir,
                                                                 monkeypatch):
    """save_total_limit=1, killed while saving checkpoint-4: `resume_from_checkpoint=True` takes checkpoint-4 if its
    marker was written, else falls back to checkpoint-2 with a warning naming both; either way the resumed run ends
    with the weights, prompt history and allocation log of the run that was killed (sequential schedule)."""
    injector = SaveInjector(monkeypatch, at=4, kill_before=kill_before)
    killed = run_to_step_4(tmp_path, char_tokenizer, model_dir, [injector])
    with pytest.raises(Killed):
        killed.train()
    weights = [p.detach().clone() for p in killed.model.parameters()]
    history, log = killed.prompt_history.state_dict(), read_allocations(killed)
    monkeypatch.undo()

    complete = kill_before == "rotation"
    resumed = run_to_step_4(tmp_path, char_tokenizer, model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=True)
    skipped = [str(w.message) for w in caught if "newest complete checkpoint" in str(w.message)]
    if complete:
        assert skipped == []
    elif kill_before != "model":  # (before the model, checkpoint-4 was not started: nothing to skip)
        assert len(skipped) == 1 and "checkpoint-2" in skipped[0] and "checkpoint-4" in skipped[0]
    assert all(torch.equal(a, b) for a, b in zip(weights, resumed.model.parameters()))
    assert resumed.prompt_history.state_dict() == history
    assert read_allocations(resumed) == log


@pytest.mark.parametrize("damage", ["torn", "missing"])
def test_a_checkpoint_with_a_torn_or_missing_gvm_state_is_never_resumed_silently(damage, tmp_path, char_tokenizer,
                                                                                 model_dir):
    run_to_step_4(tmp_path, char_tokenizer, model_dir, save_total_limit=None).train()
    state = tmp_path / "out" / "checkpoint-4" / STATE_FILE
    if damage == "torn":
        state.write_text(state.read_text()[:20])
    else:
        state.unlink()
    explicit = run_to_step_4(tmp_path, char_tokenizer, model_dir)
    with pytest.raises(ValueError, match=rf"checkpoint-4: its {STATE_FILE} is torn|checkpoint-4: it has no {STATE_FILE}"):
        explicit.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    automatic = run_to_step_4(tmp_path, char_tokenizer, model_dir)
    with pytest.warns(UserWarning, match=r"checkpoint-2, the newest complete checkpoint, instead of .*checkpoint-4"):
        automatic.train(resume_from_checkpoint=True)
    assert automatic.state.global_step == 4


def test_a_fresh_run_into_a_used_output_dir_starts_its_own_allocation_log(tmp_path, char_tokenizer, model_dir):
    for run in range(2):
        trainer = run_to_step_4(tmp_path, char_tokenizer, model_dir)
        trainer.train()
        assert [r["step"] for r in read_allocations(trainer)] == [0, 1, 2, 3]  # each step once
    assert json.loads((tmp_path / "out" / "gvm_allocations.1.jsonl").read_text().splitlines()[0])["step"] == 0


def test_a_torn_allocation_log_line_does_not_block_resuming(tmp_path, char_tokenizer, model_dir):
    run_to_step_4(tmp_path, char_tokenizer, model_dir, save_total_limit=None).train()
    with open(tmp_path / "out" / "gvm_allocations.jsonl", "a") as handle:
        handle.write('{"step": 4, "bud')  # a kill mid-append
    resumed = run_to_step_4(tmp_path, char_tokenizer, model_dir, save_total_limit=None)
    with pytest.warns(UserWarning, match="last line is torn"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert [r["step"] for r in read_allocations(resumed)] == [0, 1, 2, 3]


# -- infinite rewards -----------------------------------------------------------------------------------------------


def infinite_sometimes(prompts, completions, **kwargs):
    """graded_reward, with +inf on every 5th row and -inf on every 7th: a reward that divides by a length or takes a
    log can do this."""
    rewards = graded_reward(prompts, completions)
    return [math.inf if i % 5 == 0 else -math.inf if i % 7 == 3 else r for i, r in enumerate(rewards)]


@pytest.mark.parametrize("trainer_cls, config_cls, allocation", [
    (GVMGRPOTrainer, GVMGRPOConfig, "gvm"), (GVMGRPOTrainer, GVMGRPOConfig, "dynamic"),
    (GVMGRPOTrainer, GVMGRPOConfig, "knapsack"), (GVMGRPOTrainer, GVMGRPOConfig, "uniform"),
    (GVMRAFTTrainer, GVMRAFTConfig, "gvm"), (GVMRAFTTrainer, GVMRAFTConfig, "uniform"),
])
def test_infinite_rewards_keep_the_weights_finite_and_are_named_once(trainer_cls, config_cls, allocation, tmp_path,
                                                                     char_tokenizer):
    trainer = make_trainer(trainer_cls, config_cls, tmp_path, char_tokenizer, reward=infinite_sometimes,
                           max_steps=3, gvm_allocation=allocation, learning_rate=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    named = [str(w.message) for w in caught if "infinite reward" in str(w.message)]
    assert len(named) == 1 and "'infinite_sometimes'" in named[0]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert all(entry["gvm/nonfinite_rewards"] > 0 for entry in logs)
    low, high = trainer.gvm_state.reward_range
    assert math.isfinite(low) and math.isfinite(high)  # the range quoted in messages is the finite rewards'


def test_infinite_rewards_train_exactly_as_trl_does(tmp_path, char_tokenizer):
    """TRL's semantics, where TRL has them: with GVM off, an infinite reward zeroes its group's advantages as TRL's
    nan_to_num does, and the two trainers end with the same weights."""
    runs = {}
    for name, (trainer_cls, config_cls, options) in {
        "trl": (GRPOTrainer, GRPOConfig, {}),
        "gvm": (GVMGRPOTrainer, GVMGRPOConfig, dict(gvm_allocation="uniform", gvm_weighting="none",
                                                    gvm_num_probes=2, gvm_budget_per_prompt=2)),
    }.items():
        trainer = make_trainer(trainer_cls, config_cls, tmp_path / name, char_tokenizer, reward=infinite_sometimes,
                               max_steps=2, learning_rate=1e-2, **options)
        trainer.train()
        runs[name] = [p.detach() for p in trainer.model.parameters()]
    assert all(torch.isfinite(p).all() for p in runs["trl"])
    for ours, theirs in zip(runs["gvm"], runs["trl"]):
        assert torch.equal(ours, theirs)


# -- datasets TRL would fail on late ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, message", [
    ([{"question": f"Q{i}?"} for i in range(32)], r"no 'prompt' column \(its columns: \['question'\]\).*rename_column"),
    ([], r"train_dataset has 0 rows, fewer than the 2 prompts of one generation batch"),
    ([{"prompt": "Q0?"}], r"train_dataset has 1 rows, fewer than the 2 prompts"),
    ([{"prompt": f"Q{i}?"} for i in range(5)] + [{"prompt": "  "}], r"Row 5 of train_dataset has an empty prompt"),
    ([{"prompt": [{"role": "user", "content": "Q?"}]}, {"prompt": []}], r"Row 1 of train_dataset has an empty prompt"),
])
def test_datasets_trl_fails_on_late_are_refused_at_construction(rows, message, tmp_path, char_tokenizer):
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match=message):
        make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, dataset=dataset)


def test_an_iterable_datasets_empty_prompt_is_refused_when_it_arrives(tmp_path, char_tokenizer):
    rows = [{"prompt": f"Q{i}: {i}+1?"} for i in range(4)] + [{"prompt": ""}] * 4
    dataset = Dataset.from_list(rows).to_iterable_dataset()
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, dataset=dataset, max_steps=4,
                           per_device_train_batch_size=8)
    with pytest.raises(ValueError, match="has an empty prompt"):
        trainer.train()


# -- a budget the caps cannot spend -----------------------------------------------------------------------------------


def test_a_budget_the_cap_leaves_unspent_is_warned_once_and_logged(tmp_path, char_tokenizer):
    """16 prompts capped at 6 completions, budget 4 per prompt: spendable only while at least 11 prompts can take
    completions. Prompts 0 mod 4 are never accepted (Theorem 3 gives them nothing) and the filter drops the always
    accepted ones, leaving 8: 16 of the 64 completions are not spent."""
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, per_device_train_batch_size=64,
                           max_steps=2, gvm_max_samples=6, gvm_filter_threshold=0.99, gvm_history_decay=0.0)
    with pytest.warns(UserWarning, match=r"of a generation batch's budget were not allocated.*gvm_max_samples=6"):
        trainer.train()
    unspent = [entry["gvm/budget_unspent"] for entry in trainer.state.log_history if "gvm/budget_unspent" in entry]
    for record, logged in zip(read_allocations(trainer), unspent):
        assert logged == record["budget"] - sum(p["num_samples"] for p in record["prompts"]) > 0


def test_nothing_is_lost_when_a_run_is_refused(tmp_path, char_tokenizer, model_dir):
    """A refusal at construction leaves an output_dir and its checkpoints as they were."""
    trainer = run_to_step_4(tmp_path, char_tokenizer, model_dir)
    trainer.train()
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(ValueError):
        make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, dataset=Dataset.from_dict({"prompt": []}))
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob("*")) == before
    shutil.rmtree(tmp_path / "out")
