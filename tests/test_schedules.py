"""The generation schedules: sequential (the paper's probe round, then the allocated round), probe-ahead (one round
per batch: its allocated rows and the next batch's probes) and uniform (one round, no probes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gvm_trl import GVMGRPOConfig, GVMGRPOTrainer, GVMRAFTConfig, GVMRAFTTrainer
from gvm_trl.rollout import GenerationBatchSampler
from gvm_trl.state import STATE_FILE

from conftest import make_tiny_llama
from test_trainer import TRAINERS, config, graded_reward, last_logs, make_trainer, prompt_dataset, read_allocations


def prompts_per_step(trainer) -> list[list[int]]:
    return [[p["index"] for p in record["prompts"]] for record in read_allocations(trainer)]


class RecordingPort:
    """The trainer's port to its schedule, recording what the schedule asks: the rows of every generation call,
    every gradient-norm pass (whether it attached old log-probabilities) and every separate log-probability pass.
    `folds` overrides the fold decision (the CPU cost rule aside); `check_norms` sees every gradient-norm pass."""

    def __init__(self, trainer, folds=None, check_norms=None):
        self.port, self.folds, self.check_norms = trainer.schedule.port, folds, check_norms
        self.calls, self.norm_passes, self.logps_passes = [], [], []
        trainer.schedule.port = self

    def __getattr__(self, name):
        return getattr(self.port, name)

    def generate_rollout(self, rows, *args, **kwargs):
        self.calls.append(len(rows))
        return self.port.generate_rollout(rows, *args, **kwargs)

    def probe_grad_norms(self, probes, *, with_old_logps=False):
        self.norm_passes.append(with_old_logps)
        if self.check_norms is not None:
            return self.check_norms(probes, with_old_logps)
        return self.port.probe_grad_norms(probes, with_old_logps=with_old_logps)

    def folds_old_logps(self, probes):
        return self.port.folds_old_logps(probes) if self.folds is None else self.folds

    def attach_old_logps(self, probes):
        self.logps_passes.append(probes)
        return self.port.attach_old_logps(probes)


class CheckedSchedule:
    """The trainer's schedule, with `check(rollouts)` run on every generation batch it returns."""

    def __init__(self, trainer, check):
        self.schedule, self.check = trainer.schedule, check
        trainer.schedule = self

    def __getattr__(self, name):
        return getattr(self.schedule, name)

    def rollouts(self, *args):
        rollouts = self.schedule.rollouts(*args)
        self.check(rollouts)
        return rollouts


@pytest.mark.parametrize("trainer_cls, config_cls", TRAINERS)
def test_probe_ahead_trains_on_the_sequential_runs_prompts_in_the_same_order(trainer_cls, config_cls, tmp_path,
                                                                             char_tokenizer):
    """Across an epoch boundary (4 generation batches per epoch): each batch once per epoch, in the same order."""
    runs = {}
    for schedule in (False, True):
        trainer = make_trainer(trainer_cls, config_cls, tmp_path / str(schedule), char_tokenizer,
                               dataset=prompt_dataset(8), max_steps=6, gvm_probe_ahead=schedule)
        trainer.train()
        runs[schedule] = prompts_per_step(trainer)
    assert runs[True] == runs[False]
    epoch = sorted(i for batch in runs[True][:4] for i in batch)
    assert epoch == list(range(8))


def test_one_generation_round_per_batch(tmp_path, char_tokenizer):
    """m = 2 prompts, N′ = 4, B = 4, 3 batches. Sequential: probes and allocated rows in two rounds per batch.
    Probe-ahead: a probe round for the first batch, then one round per batch with the next batch's probes riding
    along, none after the last. Uniform: one round of N′ + B per prompt and no gradient-norm pass."""
    expected = {
        "sequential": [8, 8] * 3,
        "probe-ahead": [8, 8 + 8, 8 + 8, 8],
        "uniform": [16] * 3,
    }
    for schedule, rows in expected.items():
        options = {"gvm_allocation": "uniform"} if schedule == "uniform" else {
            "gvm_probe_ahead": schedule == "probe-ahead"
        }
        trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path / schedule, char_tokenizer, max_steps=3,
                               **options)
        port = RecordingPort(trainer)
        trainer.train()
        assert port.calls == rows, schedule
        assert len(port.norm_passes) == {"sequential": 3, "probe-ahead": 3, "uniform": 0}[schedule]
        assert trainer.rollout_totals["probe_completions"] == (0 if schedule == "uniform" else 3 * 8)
        assert getattr(trainer.schedule, "pending", None) is None  # nothing left probed at the end


def test_reused_probes_carry_the_log_probs_of_the_weights_that_drew_them(tmp_path, char_tokenizer):
    trainer = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, max_steps=2,
                           gvm_probe_ahead=True, learning_rate=1e-2)
    drawn_by = copy.deepcopy(trainer.model)  # the weights of step 0, which draw the second batch's probes
    checked = []

    def check(rollouts):
        probes = rollouts.probes
        if probes is not None and probes.step == 0 and trainer.state.global_step == 1:
            batch = probes.batch
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
            width = batch["completion_ids"].size(1)
            with torch.no_grad():
                then, _, _ = trainer._get_per_token_logps_and_entropies(drawn_by, ids, mask, width)
                now, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
            # RAFT++ trains only the accepted probes: they, and only they, carry log-probabilities.
            accepted = probes.accepted
            assert torch.isnan(batch["old_per_token_logps"][~accepted]).all()
            loss_mask = batch["completion_mask"].bool() & accepted.unsqueeze(1)
            assert loss_mask.any()
            assert torch.allclose(batch["old_per_token_logps"][loss_mask], then[loss_mask], atol=1e-5)
            assert not torch.allclose(batch["old_per_token_logps"][loss_mask], now[loss_mask], atol=1e-4)
            checked.append(True)

    CheckedSchedule(trainer, check)
    trainer.train()
    assert checked == [True]
    assert [r["probe_step"] for r in read_allocations(trainer)] == [0, 0]
    assert last_logs(trainer)["gvm/probe_age"] == 1.0


@pytest.mark.parametrize("trainer_cls, config_cls", TRAINERS)
def test_folded_old_log_probs_are_trls_own(trainer_cls, config_cls, tmp_path, char_tokenizer):
    """Probing ahead, the next batch's gradient-norm pass also attaches its probes' old log-probabilities: equal to
    TRL's `_get_per_token_logps_and_entropies` on the rows that train (left-padded prompts, temperature 0.7, fp32)
    and to the separate pass it replaces, which does not run; the norms equal the separate pass's."""
    from datasets import Dataset

    ragged = Dataset.from_list([{"prompt": [{"role": "user", "content": f"Q{i}: {i}+1" + "?" * (1 + i % 7)}]}
                                for i in range(32)])  # prompts of several lengths: left padding
    trainer = make_trainer(trainer_cls, config_cls, tmp_path, char_tokenizer, max_steps=2, gvm_probe_ahead=True,
                           temperature=0.7, learning_rate=1e-2, dataset=ragged)
    checked = []

    def measure_and_check(probes, with_old_logps):
        unfused = copy.deepcopy(probes)
        norms = trainer.probe_grad_norms(probes, with_old_logps=with_old_logps)
        if not with_old_logps:
            return norms
        batch = probes.batch
        trains = probes.trains
        assert torch.isnan(batch["old_per_token_logps"][~trains]).all()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        assert (batch["prompt_mask"] == 0).any()  # left-padded prompts: positions depend on the batch's width
        with torch.no_grad():
            trl, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids[trains], mask[trains], batch["completion_ids"].size(1))
        fused = batch["old_per_token_logps"][trains]
        assert (fused - trl).abs().max() <= 1e-6
        trainer.attach_old_logps(unfused)
        assert (fused - unfused.batch["old_per_token_logps"][trains]).abs().max() <= 1e-6
        torch.testing.assert_close(norms, trainer.probe_grad_norms(unfused), rtol=1e-5, atol=0)
        checked.append(int(trains.sum()))
        return norms

    port = RecordingPort(trainer, folds=True, check_norms=measure_and_check)  # whatever the CPU cost rule says
    trainer.train()
    assert len(checked) == 1 and checked[0] > 0 and port.logps_passes == []
    assert trainer.rollout_totals["time_probe_logps"] == 0 < trainer.rollout_totals["time_grad_norms"]


@pytest.mark.parametrize("trainer_cls, config_cls", TRAINERS)
def test_folded_and_separate_log_prob_passes_train_alike(trainer_cls, config_cls, tmp_path, char_tokenizer):
    """The same run with the fold (one forward for norms and old log-probabilities) and without (two): the same
    allocations, losses and weights to rounding; only the separate one runs the probe_logps forward."""
    runs = {}
    for fold in (True, False):
        trainer = make_trainer(trainer_cls, config_cls, tmp_path / str(fold), char_tokenizer, max_steps=3,
                               gvm_probe_ahead=True, temperature=0.7, learning_rate=1e-2)
        port = RecordingPort(trainer, folds=fold)  # (the CPU cost rule aside)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        runs[fold] = (logs, read_allocations(trainer), [p.detach().clone() for p in trainer.model.parameters()],
                      len(port.logps_passes), trainer.rollout_totals["time_probe_logps"])
    (fused_logs, fused_alloc, fused_weights, fused_forwards, fused_time) = runs[True]
    (logs, alloc, weights, forwards, seconds) = runs[False]
    assert fused_forwards == fused_time == 0 and forwards == 2 and seconds > 0
    assert [[p["num_samples"] for p in r["prompts"]] for r in fused_alloc] == [
        [p["num_samples"] for p in r["prompts"]] for r in alloc]
    for a, b in zip(fused_alloc, alloc):
        assert [p["grad_norm"] for p in a["prompts"]] == pytest.approx([p["grad_norm"] for p in b["prompts"]],
                                                                        rel=1e-5, nan_ok=True)
    assert len(fused_logs) == len(logs) == 3
    for a, b in zip(fused_logs, logs):
        for key in ("loss", "grad_norm", "reward", "gvm/grad_norm", "gvm/accept_rate"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6, nan_ok=True), key
    for a, b in zip(fused_weights, weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_fold_runs_where_one_pass_costs_less(tmp_path, char_tokenizer):
    """On a CPU the fused pass costs 3·(a + r) forwards, the separate passes 3·a + (a + r), for a accepted probes and
    r that train unaccepted: fold iff 2·r ≤ a. RAFT++ trains only accepted rows (r = 0): it always folds."""
    from types import SimpleNamespace

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, max_steps=1, gvm_probe_ahead=True)

    def probes(accepted, trains, batch=None):
        return SimpleNamespace(batch={} if batch is None else batch, accepted=accepted, trains=trains)

    every = torch.ones(6, dtype=torch.bool)
    for accepted_count, folds in ((6, True), (4, True), (3, False), (0, False)):  # GRPO: every probe trains
        accepted = torch.arange(6) < accepted_count
        assert trainer.folds_old_logps(probes(accepted, every)) is folds, accepted_count
    accepted = torch.arange(6) < 1
    assert trainer.folds_old_logps(probes(accepted, accepted))  # RAFT++: the accepted rows train
    assert not trainer.folds_old_logps(probes(every, every, {"old_per_token_logps": None}))  # TRL's own


def test_on_policy_rows_beside_reused_probes_take_the_current_log_probs(tmp_path, char_tokenizer):
    """Rows without old log-probabilities (NaN, drawn by the current weights) get the current ones, detached: the
    loss equals TRL's loss on the same rows with those log-probabilities filled in by hand."""
    from test_trainer import hand_built_batch

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model.train()
    batch = hand_built_batch(char_tokenizer)
    batch.pop("ref_per_token_logps")
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, ids.size(1) - 4)
    by_hand = dict(batch, old_per_token_logps=batch["old_per_token_logps"].clone())
    by_hand["old_per_token_logps"][[1, 3]] = current[[1, 3]]
    marked = dict(batch, old_per_token_logps=batch["old_per_token_logps"].clone())
    marked["old_per_token_logps"][[1, 3]] = float("nan")
    expected = trainer.compute_loss(model, by_hand)
    assert trainer.compute_loss(model, marked).item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.isnan(marked["old_per_token_logps"]).any()


def test_probe_ahead_resumes_with_the_same_prompts_and_probes_its_batch_again(tmp_path, char_tokenizer):
    model_dir = tmp_path / "model"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    options = dict(save_strategy="steps", save_steps=2, max_steps=4, gvm_probe_ahead=True)
    first = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    first.train()
    full_run = read_allocations(first)
    (tmp_path / "out" / "gvm_allocations.jsonl").unlink()
    resumed = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    after = read_allocations(resumed)
    assert [[p["index"] for p in r["prompts"]] for r in after] == [[p["index"] for p in r["prompts"]] for r in full_run[2:]]
    assert [r["probe_step"] for r in full_run] == [0, 0, 1, 2]
    assert [r["probe_step"] for r in after] == [2, 2]  # the batch probed before the checkpoint is probed again


def test_sampler_matches_trls_and_looks_ahead_across_epochs():
    from trl.trainer.utils import RepeatSampler

    data = list(range(11))
    ours = GenerationBatchSampler(data, mini_repeat_count=3, batch_size=4, repeat_count=2, seed=5)
    theirs = RepeatSampler(data, mini_repeat_count=3, batch_size=4, repeat_count=2, seed=5)
    for _ in range(3):  # three epochs: the same permutations, in the same layout
        assert list(ours) == list(theirs)
    sampler = GenerationBatchSampler(data, mini_repeat_count=1, batch_size=4, repeat_count=1, seed=5)
    first_epoch = list(sampler)
    batches = [first_epoch[0:4], first_epoch[4:8]]
    assert sampler.following(batches[0]) == batches[1]
    upcoming = sampler.following(batches[1])  # the next epoch's first batch, drawn early ...
    assert list(sampler)[:4] == upcoming  # ... and used when that epoch starts
    reference = RepeatSampler(data, mini_repeat_count=1, batch_size=4, repeat_count=1, seed=5)
    list(reference)
    assert list(reference)[:4] == upcoming  # the sequence of permutations is TRL's
    assert sampler.following([99]) is None
    resumed = GenerationBatchSampler(data, mini_repeat_count=3, batch_size=4, repeat_count=2, seed=5)
    resumed.set_epoch(2)  # what Trainer calls when a resumed run starts in its third epoch
    fresh = RepeatSampler(data, mini_repeat_count=3, batch_size=4, repeat_count=2, seed=5)
    list(fresh), list(fresh)
    assert list(resumed) == list(fresh)


# -- estimates that survive few probes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, decay",
    [
        ({}, 0.7),  # the measured default: GVM allocation, `mean` weights
        ({"gvm_weighting": "none"}, 0.7),
        ({"gvm_weighting": "lemma1"}, 0.0),  # measured unstable with a history
        ({"gvm_allocation": "uniform", "gvm_weighting": "none"}, 0.0),  # nothing to estimate
        ({"gvm_history_decay": 0.0}, 0.0),
        ({"gvm_history_decay": 0.9}, 0.9),
        ({"gvm_allocation": "uniform", "gvm_history_decay": 0.0}, 0.0),  # an explicit "none" is no contradiction
    ],
)
def test_history_decay_in_use(fields, decay, tmp_path):
    assert config(GVMGRPOConfig, tmp_path, **fields).gvm_history_decay_in_use == decay


def test_default_trainer_keeps_a_history_and_lemma1_with_one_warns(tmp_path, char_tokenizer):
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, dataset=prompt_dataset(8))
    assert trainer.prompt_history is not None and trainer.prompt_history.decay == 0.7
    trainer.create_model_card(model_name="tiny")
    assert "| `gvm_history_decay` | `0.7` |" in (tmp_path / "out" / "README.md").read_text()  # the decay in use
    with pytest.warns(UserWarning, match="lemma1.*unstable"):
        config(GVMGRPOConfig, tmp_path, gvm_weighting="lemma1", gvm_history_decay=0.5)


@pytest.mark.parametrize("allocation", ["gvm", "dynamic", "knapsack"])
def test_history_feeds_the_allocation_and_is_checkpointed(allocation, tmp_path, char_tokenizer):
    """Two epochs over 8 prompts: the second visit's accept rates combine both visits' counts, as PromptHistory
    computes them; the checkpoint holds the history, and a resumed run restores it (every probing policy)."""
    model_dir = tmp_path / "model"
    make_tiny_llama(char_tokenizer).save_pretrained(model_dir)
    options = dict(dataset=prompt_dataset(8), max_steps=8, gvm_history_decay=0.5, gvm_probe_ahead=False,
                   save_strategy="steps", save_steps=4, gvm_allocation=allocation)
    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    trainer.train()
    records = read_allocations(trainer)
    first_visit = {p["index"]: p for r in records[:4] for p in r["prompts"]}
    for record in records[4:]:
        for p in record["prompts"]:
            past = first_visit[p["index"]]
            trials = 0.5 * (4 + past["num_samples"]) + 4
            accepted = 0.5 * (past["probes_accepted"] + past["num_accepted"]) + p["probes_accepted"]
            assert p["accept_rate"] == pytest.approx(accepted / trials)
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / STATE_FILE).read_text())
    assert sorted(map(int, saved["prompt_history"]["prompts"])) == list(range(8))

    resumed = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, model=str(model_dir), **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.prompt_history.state_dict() == trainer.prompt_history.state_dict()
    with pytest.raises(ValueError, match="gvm_history_decay"):
        other = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, model=str(model_dir),
                             **dict(options, gvm_history_decay=0.9))
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


def test_exploration_floor_samples_prompts_whose_probes_all_failed(tmp_path, char_tokenizer):
    """Prompts 0 mod 4 are never accepted: without the floor they get nothing, with it `gvm_explore_samples`."""
    for explore in (0, 2):
        trainer = make_trainer(GVMRAFTTrainer, GVMRAFTConfig, tmp_path / str(explore), char_tokenizer,
                               per_device_train_batch_size=16, max_steps=2, gvm_explore_samples=explore)
        trainer.train()
        for record in read_allocations(trainer):
            for p in record["prompts"]:
                if p["index"] % 4 == 0:
                    assert p["accept_rate"] == 0 and p["num_samples"] == explore
            assert sum(p["num_samples"] for p in record["prompts"]) == record["budget"]


# -- what is logged describes the rows trained on -------------------------------------------------------------------


def test_logged_completions_and_metrics_describe_the_training_rows(tmp_path, char_tokenizer):
    captured = {}

    class Capturing(GVMRAFTTrainer):
        def build_generation_batch(self, *args, **kwargs):
            batch = super().build_generation_batch(*args, **kwargs)
            captured.update(batch)
            return batch

    trainer = make_trainer(Capturing, GVMRAFTConfig, tmp_path, char_tokenizer, per_device_train_batch_size=16,
                           max_steps=1, gvm_probe_ahead=False)
    trainer.train()
    logs = trainer._logs
    rows = len(captured["advantages"])
    assert len(logs["prompt"]) == len(logs["advantages"]) == rows  # the trained rows, not every generated one
    assert sorted(logs["advantages"]) == pytest.approx(sorted(captured["advantages"].tolist()))
    assert all(reward == 1.0 for reward in logs["rewards"]["graded_reward"])  # RAFT++ trains on accepted rows
    assert set(logs["extra"]["gvm_phase"]) <= {"probe", "allocated"}
    log = last_logs(trainer)
    assert log["reward"] == 1.0
    assert log["num_tokens"] == int(captured["prompt_mask"].sum() + captured["completion_mask"].sum())


def test_user_logged_columns_and_metrics_survive(tmp_path, char_tokenizer):
    def reward(completions, log_extra, log_metric, **kwargs):
        log_extra("length", [len(c[0]["content"]) for c in completions])
        log_metric("custom/rows", float(len(completions)))
        return graded_reward(kwargs["prompts"], completions)

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, reward=reward, max_steps=1,
                           gvm_probe_ahead=False)
    trainer.train()
    assert len(trainer._logs["extra"]["length"]) == len(trainer._logs["prompt"])
    assert last_logs(trainer)["custom/rows"] == 8.0  # each of the two calls scored 8 rows


def test_rows_without_old_log_probs_are_filled_as_wide_as_their_completions():
    from gvm_trl.rollout import concat_rollout_batches

    def rows(count, width, with_logps):
        batch = {
            "prompt_ids": torch.ones(count, 3, dtype=torch.long), "prompt_mask": torch.ones(count, 3, dtype=torch.long),
            "completion_ids": torch.ones(count, width, dtype=torch.long),
            "completion_mask": torch.ones(count, width, dtype=torch.long), "advantages": torch.ones(count),
        }
        if with_logps:
            batch["old_per_token_logps"] = torch.zeros(count, width)
        return batch

    merged = concat_rollout_batches([rows(2, 5, True), rows(3, 7, False)], {"prompt_ids": 0, "completion_ids": 0})
    assert merged["completion_ids"].shape == merged["old_per_token_logps"].shape == (5, 7)
    assert torch.isnan(merged["old_per_token_logps"][2:]).all()
    assert not torch.isnan(merged["old_per_token_logps"][:2]).any()


@pytest.mark.parametrize("allocation", ["dynamic", "knapsack"])
def test_history_only_peers_allocate_from_the_probes_without_a_gradient_pass(allocation, tmp_path, char_tokenizer):
    """Prompts 0 mod 4 are never accepted (p = 0) and 1 mod 4 always (p = 1): both policies give them nothing, the
    others what the policy's own function gives them from the logged estimates; no gradient-norm pass runs."""
    from gvm_trl.allocation import dynamic_sampling_allocation, knapsack_allocation

    trainer = make_trainer(GVMGRPOTrainer, GVMGRPOConfig, tmp_path, char_tokenizer, max_steps=3,
                           gvm_allocation=allocation, gvm_history_decay=0.0, gvm_probe_ahead=False)
    port = RecordingPort(trainer)
    trainer.train()
    assert port.norm_passes == [] and "gvm/grad_norm" not in last_logs(trainer)
    budget, probes = trainer.args.gvm_budget, trainer.args.gvm_num_probes
    for record in read_allocations(trainer):
        rates = [p["accept_rate"] for p in record["prompts"]]
        sizes = [p["num_samples"] for p in record["prompts"]]
        assert all(p["grad_norm"] is None for p in record["prompts"])
        if not any(0 < rate < 1 for rate in rates):
            assert record["uniform_fallback"] and sizes == [budget // len(sizes)] * len(sizes)
            continue
        if allocation == "dynamic":
            assert sizes == dynamic_sampling_allocation(rates, budget)
        else:  # each prompt's whole group (its reused probes too) is valued
            assert sizes == [n - probes for n in knapsack_allocation(rates, budget + probes * len(rates),
                                                                       min_samples=probes)]
        for p in record["prompts"]:
            if p["index"] % 4 in (0, 1):
                assert p["num_samples"] == 0


@pytest.mark.parametrize(
    "options, name",
    [
        ({"gvm_allocation": "gvm", "gvm_dynamic_epsilon": 0.1}, "gvm_dynamic_epsilon"),
        ({"gvm_allocation": "dynamic", "gvm_explore_samples": 1}, "gvm_explore_samples"),
        ({"gvm_allocation": "knapsack", "gvm_filter_threshold": 0.9}, "gvm_filter_threshold"),
        ({"gvm_allocation": "uniform", "gvm_filter_insufficient": 1.0}, "gvm_filter_insufficient"),
        ({"gvm_allocation": "dynamic", "gvm_dynamic_epsilon": 0.5}, "gvm_dynamic_epsilon"),
        ({"gvm_allocation": "uniform", "gvm_history_decay": 0.5}, "gvm_history_decay"),
    ],
)
def test_policy_options_are_refused_where_they_cannot_apply(options, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        config(GVMGRPOConfig, tmp_path, **options)


@pytest.mark.parametrize("trainer_cls, config_cls", TRAINERS)
def test_reinforce_ada_trains_what_its_own_functions_choose(trainer_cls, config_cls, tmp_path, char_tokenizer):
    """Each generation batch: rounds of 8 per prompt its exit rule has not finished (replayed with
    `reinforce_ada_round`), then the rows `reinforce_ada_group` picks train (RAFT++: those of them accepted); the
    allocation log and `gvm/generation_rounds` say what was drawn."""
    from gvm_trl.allocation import reinforce_ada_group, reinforce_ada_round

    trainer = make_trainer(trainer_cls, config_cls, tmp_path, char_tokenizer, max_steps=2,
                           gvm_allocation="reinforce-ada", gvm_weighting="none", gvm_ada_max_rounds=3)
    batches = []
    CheckedSchedule(trainer, batches.append)
    trainer.train()
    for batch, record in zip(batches, read_allocations(trainer)):
        m = len(batch.allocation.sizes)
        accepted, rejected = [0] * m, [0] * m
        for index, rollout in enumerate(batch.rounds):
            sizes = reinforce_ada_round(accepted, rejected, index, max_rounds=3, group_size=4)
            assert [int((rollout.prompts == i).sum()) for i in range(m)] == sizes
            for slot, ok in zip(rollout.prompts.tolist(), rollout.accepted.tolist()):
                accepted[slot], rejected[slot] = accepted[slot] + ok, rejected[slot] + (not ok)
        assert [p["num_samples"] for p in record["prompts"]] == [a + r for a, r in zip(accepted, rejected)]
        prompts, outcomes = torch.cat([r.prompts for r in batch.rounds]), torch.cat([r.accepted for r in batch.rounds])
        trains = torch.cat([r.trains for r in batch.rounds])
        for slot in range(m):
            rows = (prompts == slot).nonzero().flatten()
            chosen = rows[reinforce_ada_group(outcomes[rows].tolist(), group_size=4)]
            expected = chosen if trainer_cls is GVMGRPOTrainer else chosen[outcomes[chosen]]
            assert trains.nonzero().flatten()[prompts[trains] == slot].tolist() == expected.tolist()
    log = last_logs(trainer)
    assert log["gvm/generation_rounds"] == len(batches[-1].rounds) and log["gvm/probe_completions"] == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
