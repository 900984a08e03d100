"""LoRA targets checked on a model's geometry, before it loads, the way engine.models.loading checks them on the model."""

from __future__ import annotations

import pytest

from engine.models.catalog import lookup
from engine.config.schema import build_config
from engine.memory.estimate import linear_names, lora_target_problem
from engine.models.loading import Precision, linear_module_names, load_model


@pytest.mark.parametrize("target", ["all", " all ", "q_proj,v_proj", "q_proj, down_proj", "gate_proj"])
def test_targets_the_model_has_pass(target):
    assert lora_target_problem(lookup("llama2-7b").geometry, target) is None


def test_a_missing_target_names_the_layers_there_are():
    assert lora_target_problem(lookup("tiny-mixtral").geometry, "q_proj,gate_proj") == (
        "lora_target gate_proj not found in this model; its linear layers are: q_proj, k_proj, v_proj, o_proj; "
        "or use all")
    assert lora_target_problem(lookup("tiny-llama").geometry, " , ") == \
        "lora_target is empty: give module names (comma separated) or all"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
def test_the_geometry_names_the_layers_the_loaded_model_has(name, tiny_models):
    model = load_model(str(tiny_models[name]), build_config({}), Precision("fp32", ""), "sdpa")
    assert sorted(linear_names(lookup(name).geometry)) == linear_module_names(model)
