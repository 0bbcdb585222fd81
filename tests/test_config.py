"""Every `gvm_*` field is checked at construction against its annotation, range and choices, and every refusal names
the field and the fix; the rules between fields and the ones an iterable dataset imposes live in one place each."""

from __future__ import annotations

import math
import typing
from dataclasses import fields

import pytest

from gvm_trl import GVMArguments, GVMGRPOConfig
from gvm_trl.config import FIELD_RANGES, dataset_settings
from test_trainer import config

HINTS = typing.get_type_hints(GVMArguments)


def fields_of(kind: type) -> list[str]:
    """The `gvm_*` fields annotated `kind` or `kind | None`."""
    return [f.name for f in fields(GVMArguments) if kind in (typing.get_args(HINTS[f.name]) or (HINTS[f.name],))]


def test_every_field_has_a_type_and_every_number_a_range():
    for spec in fields(GVMArguments):
        assert spec.name.startswith("gvm_")
        members = [m for m in typing.get_args(HINTS[spec.name]) or (HINTS[spec.name],) if m is not type(None)]
        assert len(members) == 1 and members[0] in (int, float, bool, str), spec.name
        if members[0] in (int, float):
            assert spec.name in FIELD_RANGES, spec.name
        if members[0] is str and spec.name != "gvm_grad_params":
            assert "choices" in spec.metadata, spec.name


@pytest.mark.parametrize("name", fields_of(int))
@pytest.mark.parametrize("value", [2.5, 2.0, "4", True])
def test_integer_fields_refuse_floats_strings_and_bools(name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"^{name} must be an integer.*{type(value).__name__}"):
        config(GVMGRPOConfig, tmp_path, **{name: value})


def test_a_quoted_number_is_told_to_lose_its_quotes(tmp_path):
    with pytest.raises(ValueError, match="gvm_num_probes.*write 4 without quotes"):
        config(GVMGRPOConfig, tmp_path, gvm_num_probes="4")
    with pytest.raises(ValueError, match="gvm_alpha.*write 0.001 without quotes"):
        config(GVMGRPOConfig, tmp_path, gvm_alpha="1e-3")


@pytest.mark.parametrize("name", fields_of(bool))
@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_flags_take_only_bools(name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"^{name} must be True or False"):
        config(GVMGRPOConfig, tmp_path, **{name: value})


@pytest.mark.parametrize("name", fields_of(float))
def test_real_fields_refuse_strings_nan_and_infinities(name, tmp_path):
    for value in ("0.5", math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            config(GVMGRPOConfig, tmp_path, **{name: value})


@pytest.mark.parametrize("name, value", [("gvm_alpha", 1), ("gvm_beta", 3), ("gvm_accept_threshold", 1),
                                         ("gvm_history_decay", 1)])
def test_real_fields_accept_ints(name, value, tmp_path):
    assert getattr(config(GVMGRPOConfig, tmp_path, **{name: value}), name) == value


@pytest.mark.parametrize("name", [f.name for f in fields(GVMArguments) if "choices" in f.metadata])
def test_choice_fields_list_their_choices(name, tmp_path):
    with pytest.raises(ValueError, match=rf"^{name} must be one of"):
        config(GVMGRPOConfig, tmp_path, **{name: "no-such-choice"})


def test_help_texts_name_every_choice():
    for spec in fields(GVMArguments):
        for choice in spec.metadata.get("choices", ()):
            assert choice in spec.metadata["help"] or choice in GVMArguments.__doc__, (spec.name, choice)


def test_a_cap_that_cannot_hold_the_budget_is_refused(tmp_path):
    """m = 2 prompts at most 1 completion each cannot take a budget of 8: refused, naming the least cap that can."""
    with pytest.raises(ValueError, match="gvm_max_samples=1 caps the 2 prompts.*at least 4"):
        config(GVMGRPOConfig, tmp_path, gvm_max_samples=1)
    assert config(GVMGRPOConfig, tmp_path, gvm_max_samples=4).gvm_max_samples == 4


@pytest.mark.parametrize("option", [{"gvm_min_samples": 1}, {"gvm_max_samples": 8}])
def test_budget_bounds_need_a_plan(option, tmp_path):
    """Uniform allocation has no plan for a floor or a cap to shape: refused rather than silently ignored."""
    with pytest.raises(ValueError, match=f"{next(iter(option))} needs probes"):
        config(GVMGRPOConfig, tmp_path, gvm_allocation="uniform", **option)


def test_iterable_dataset_rules_live_in_one_function(tmp_path):
    default = config(GVMGRPOConfig, tmp_path)
    assert dataset_settings(default, iterable=False) == (True, 0.7)
    assert dataset_settings(default, iterable=True) == (False, 0.0)
    assert dataset_settings(config(GVMGRPOConfig, tmp_path, gvm_allocation="uniform"), iterable=False) == (False, 0.0)
    for option in ({"gvm_probe_ahead": True}, {"gvm_history_decay": 0.5}):
        with pytest.raises(NotImplementedError, match=f"{next(iter(option))}.*map-style"):
            dataset_settings(config(GVMGRPOConfig, tmp_path, **option), iterable=True)


@pytest.mark.parametrize("options, message", [
    ({"gvm_allocation": "reinforce-ada"}, "gvm_weighting='mean' does not apply to gvm_allocation='reinforce-ada'"),
    ({"gvm_allocation": "reinforce-ada", "gvm_weighting": "none", "gvm_num_probes": 4},
     "gvm_num_probes do not apply to gvm_allocation='reinforce-ada'"),
    ({"gvm_allocation": "reinforce-ada", "gvm_weighting": "none", "gvm_history_decay": 0.5},
     "gvm_history_decay needs probes and a plan"),
    ({"gvm_allocation": "reinforce-ada", "gvm_weighting": "none", "gvm_probe_ahead": True},
     "gvm_probe_ahead=True needs probes and a plan"),
    ({"gvm_allocation": "reinforce-ada", "gvm_weighting": "none", "gvm_ada_group_size": 40},
     "gvm_ada_group_size=40 exceeds the 32 completions"),
    ({"gvm_ada_round_size": 4}, "gvm_ada_round_size applies to gvm_allocation='reinforce-ada' only"),
    ({"gvm_ada_group_size": 4}, "gvm_ada_group_size applies to gvm_allocation='reinforce-ada' only"),
    ({"gvm_allocation": "reinforce-ada", "gvm_weighting": "none", "gvm_ada_exit": "both"},
     "gvm_ada_exit must be one of"),
])
def test_reinforce_ada_options_are_checked(options, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(GVMGRPOConfig, tmp_path, **options)


def test_reinforce_ada_defaults_are_the_papers(tmp_path):
    args = config(GVMGRPOConfig, tmp_path, gvm_allocation="reinforce-ada", gvm_weighting="none")
    assert (args.gvm_ada_round_size, args.gvm_ada_max_rounds, args.gvm_ada_exit) == (8, 4, "balanced")
    assert args.gvm_ada_group_size == args.num_generations == 4  # the paper's script: n = 4
    assert dataset_settings(args, iterable=False) == (False, 0.0)
    assert args.gvm_completions_per_batch == 2 * 8 * 4
