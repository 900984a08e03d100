"""`tuner train` on a demo model with nothing but the model, the data and a directory: the catalog's demo recipe
sets the training, is recorded in the run's config.yaml, learns the bundled data, and chat then answers in its
format."""

from __future__ import annotations

import re

import yaml

from engine.cli import main
from engine.config.schema import build_config
from engine.infer.chat import start_chat
from engine.models.catalog import lookup
from engine.rundir import read_events

# Prompts of the demo data's kinds, with words and numbers the data does not pair this way, and the answer's form.
PROMPTS = {
    "What is 41 - 17?": r"\d+ - \d+ = -?\d+\.",
    "How many letters are in 'garden'?": r"'[a-z]+' has \d+ letters\.",
    "Spell 'lamp' letter by letter.": r"[a-z](-[a-z])+",
}


def test_bare_demo_run_trains_with_the_recipe_learns_and_answers_in_the_datas_format(home, capsys):
    out = home / "demo"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir",
                 str(out)]) == 0
    recipe = lookup("tiny-llama").recipe
    assert "demo recipe of tiny-llama: finetuning_type full, learning_rate 0.003" in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {key: saved[key] for key in recipe} == recipe
    losses = [e["loss"] for e in read_events(out) if e["type"] == "log"]
    assert len(losses) == recipe["max_steps"] // recipe["logging_steps"]
    assert losses[-1] <= losses[0] / 4, losses
    assert (out / "model.safetensors").is_file()

    chat = start_chat(build_config({"model_name_or_path": str(out), "max_new_tokens": 24}))
    answers = {}
    for prompt in PROMPTS:
        chat.clear()
        answers[prompt] = chat.reply(prompt)
    formed = [prompt for prompt, form in PROMPTS.items() if re.fullmatch(form, answers[prompt].strip())]
    assert len(formed) >= 2, answers


def test_a_key_set_otherwise_trains_without_the_recipe(home, capsys):
    out = home / "lora"
    assert main(["train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--output_dir", str(out),
                 "--finetuning_type", "lora", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no"]) == 0
    assert "recipe" not in capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["finetuning_type"], saved["max_steps"], saved["learning_rate"]) == ("lora", 2, 5e-5)
    assert (out / "adapter_model.safetensors").is_file()
