"""The catalog's recipes: a model's entry brings a whole training setup, used unless the user's keys say otherwise."""

from __future__ import annotations

from engine.config.schema import build_config
from engine.models.catalog import list_models, lookup, with_recipe

DEMO_RECIPE = {"finetuning_type": "full", "learning_rate": 3e-3, "max_steps": 300, "per_device_train_batch_size": 16,
               "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 10}
DEMO = {"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"}


def test_every_demo_model_carries_the_demo_recipe_and_no_other_model_one():
    assert {spec.name: spec.recipe for spec in list_models() if spec.recipe} == {
        "tiny-llama": DEMO_RECIPE, "tiny-mistral": DEMO_RECIPE, "tiny-mixtral": DEMO_RECIPE}


def test_the_whole_recipe_applies_when_the_user_set_none_of_its_keys():
    use = with_recipe(dict(DEMO, template="alpaca", cutoff_len=512))
    assert use.applied == DEMO_RECIPE and use.model == "tiny-llama" and use.demo
    assert use.values == {**DEMO, "template": "alpaca", "cutoff_len": 512, **DEMO_RECIPE}
    cfg = build_config(use.values)
    assert (cfg.finetune.finetuning_type, cfg.train.learning_rate, cfg.train.max_steps) == ("full", 3e-3, 300)


def test_keys_set_to_the_recipes_own_values_keep_it():
    use = with_recipe(dict(DEMO, finetuning_type="full", learning_rate="3e-3", max_steps="300", logging_steps=""))
    assert use.applied == DEMO_RECIPE


def test_one_key_set_otherwise_keeps_the_whole_recipe_out():
    given = dict(DEMO, model_name_or_path="TINY-MISTRAL", learning_rate="1e-4")
    use = with_recipe(given)
    assert (use.values, use.applied, use.overridden, use.model) == (given, {}, ("learning_rate",), "tiny-mistral")
    assert use.describe() == "demo recipe of tiny-mistral not used: learning_rate set"


def test_keys_that_stand_for_a_recipe_key_keep_it_out_too():
    for key, value in (("num_train_epochs", 2), ("warmup_steps", 5), ("quantization_bit", 4), ("lora_rank", 16),
                       ("lora_r", 16), ("lora_target", "q_proj"), ("checkpoint_dir", "adapter"), ("use_dora", True),
                       ("freeze_trainable_layers", 5), ("pissa_init", True)):
        assert with_recipe(dict(DEMO, **{key: value})).applied == {}, key
    assert with_recipe(dict(DEMO, stage="sft", do_train=True, quantization_bit=None)).applied == DEMO_RECIPE


def test_models_without_a_recipe_are_left_as_given():
    for name in ("llama2-7b", "meta-llama/Llama-3.1-8B", "/some/local/dir", ""):
        given = {"model_name_or_path": name, "dataset": "demo_alpaca"}
        use = with_recipe(given)
        assert (use.values, use.applied, use.model) == (given, {}, None)
    assert lookup("llama2-7b").recipe == {}


def test_the_description_names_what_the_recipe_set():
    assert with_recipe(DEMO).describe() == (
        "demo recipe of tiny-llama: finetuning_type full, learning_rate 0.003, max_steps 300, "
        "per_device_train_batch_size 16, lr_scheduler_type cosine, warmup_ratio 0.05, logging_steps 10 "
        "(set any of these keys to train without it)")


def test_overriding_keys_are_named_by_their_current_names():
    assert with_recipe(dict(DEMO, lora_r=16, per_device_train_batch_size=8)).overridden == (
        "lora_rank", "per_device_train_batch_size")


def test_keys_at_the_config_default_as_a_saved_config_holds_them_keep_the_recipe():
    saved = dict(DEMO, num_train_epochs=3.0, warmup_steps=0, use_dora=False, lora_rank=8, lora_target="all",
                 quantization_bit=None, adapter_name_or_path=None)
    assert with_recipe(saved).applied == DEMO_RECIPE
