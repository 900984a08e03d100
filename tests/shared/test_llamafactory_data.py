"""LLaMA-Factory's real registry and demo data (../shared/data/llamafactory) read as they are; the entries the default
suite mirrors (tests/llamafactory_layout.py) are LLaMA-Factory's own."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from llamafactory_layout import MIRRORED
from test_data_registry import refusal

from engine.config.schema import build_config
from engine.config.validation import validate
from engine.data import dataset_names, load_conversations, load_registry
from engine.errors import UserError

DEMOS = ["demo_alpaca", "demo_sharegpt", "demo_openai", "demo_pairs", "demo_feedback"]


def test_the_entries_the_default_suite_mirrors_are_llamafactorys(shared_data):
    theirs = json.loads((shared_data / "llamafactory" / "dataset_info.json").read_text())
    assert {name: theirs[name] for name in MIRRORED} == MIRRORED


def test_llamafactory_alpaca_demo(shared_data):
    dataset_dir = str(shared_data / "llamafactory")
    full = load_conversations("alpaca_en_demo", dataset_dir)
    assert len(full.train) == 999
    first = json.loads((shared_data / "llamafactory" / "alpaca_en_demo.json").read_text())[0]
    assert full.train[0]["messages"] == [{"role": "user", "content": first["instruction"]},
                                         {"role": "assistant", "content": first["output"]}]
    assert len(load_conversations("alpaca_en_demo", dataset_dir, max_samples=50).train) == 50

    split = load_conversations("alpaca_en_demo", dataset_dir, val_size=0.1, seed=7)
    assert (len(split.train), len(split.eval)) == (899, 100)
    assert split.report.split == "split off 100 of 999 for evaluation (val_size=0.1, seed=7)"
    counted = load_conversations("alpaca_en_demo", dataset_dir, max_samples=100, val_size=25)
    assert (len(counted.train), len(counted.eval)) == (75, 25)


def test_llamafactory_identity_warns_once_about_its_placeholders(shared_data):
    path = shared_data / "llamafactory" / "identity.json"
    records = json.loads(path.read_text())
    loaded = load_conversations("identity", str(shared_data / "llamafactory"))
    assert len(loaded.train) == len(records) == 91
    assert loaded.train[0] == {"messages": [
        {"role": "user", "content": records[0]["instruction"]},
        {"role": "assistant", "content": records[0]["output"]}], "tools": ""}
    holding = sum("{{" in record["instruction"] + record["output"] for record in records)
    assert loaded.report.lines() == [
        f"identity: 91 conversations (alpaca, {path.resolve()})",
        f"warning: identity: {holding} of 91 conversations hold the placeholders {{{{name}}}}, {{{{author}}}}: "
        f"replace them in {path.resolve()} with your own text before training"]


def test_reads_llamafactory_registry_as_it_is(shared_data):
    registry = load_registry(str(shared_data / "llamafactory"))
    assert len(registry) == 104 + len(DEMOS)
    assert dataset_names(str(shared_data / "llamafactory"))[:len(DEMOS)] == DEMOS

    demo = registry["alpaca_en_demo"]
    assert (demo.load_from, demo.formatting) == ("file", "alpaca")
    assert demo.location == str((shared_data / "llamafactory" / "alpaca_en_demo.json").resolve())
    assert demo.columns == {"prompt": "instruction", "query": "input", "response": "output"}

    # each entry's shape is read as the default suite reads its mirror (test_data_registry.py)


def test_every_llamafactory_entry_is_understood_or_refused_with_a_reason(shared_data):
    registry = load_registry(str(shared_data / "llamafactory"))
    refusals = {name: refusal(attr) for name, attr in registry.items()}
    kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in refusals.values())
    # for supervised training (our demo_feedback too, whose desirable replies it learns); the 13 preference entries
    # (12 of theirs and our demo_pairs) are stage dpo's
    assert kinds == {"understood": 69, "is a preference": 13, "is multimodal": 10, "maps no response column": 17}
    assert refusals["mllm_video_audio_demo"] == "is multimodal (videos, audios), which is not supported"
    assert refusals["c4_demo"] == ("maps no response column (it maps prompt=text): plain text, for pre-training; set "
                                   "stage pt to train on it")
    assert refusals["dpo_en_demo"] == "is a preference (ranking) dataset for DPO / reward modelling"
    for name in ("glaive_toolcall_en_demo", "kto_en_demo", "ultrafeedback_kto", "ultrachat_200k", "alpaca_en"):
        assert refusals[name] == "understood"
    assert set(registry["glaive_toolcall_en"].columns) == {"messages", "tools"}
    assert registry["kto_mix_en"].columns["kto_tag"] == "label"


def test_llamafactory_text_sft_files_that_are_present_load_end_to_end(shared_data):
    loaded = load_conversations("alpaca_en_demo,identity", str(shared_data / "llamafactory"))
    assert [(report.name, report.records, report.kept, report.dropped) for report in loaded.report.train] == [
        ("alpaca_en_demo", 999, 999, {}), ("identity", 91, 91, {})]
    assert len(loaded.train) == 999 + 91
    assert all(conversation["tools"] == "" and [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
               for conversation in loaded.train)


def test_every_file_dataset_present_loads_or_is_refused_in_one_line(shared_data):
    folder = shared_data / "llamafactory"
    for name, attr in load_registry(str(folder)).items():
        if attr.load_from != "file" or name in DEMOS or not Path(attr.location).exists():
            continue
        try:
            loaded = load_conversations(name, str(folder))
        except UserError as err:
            assert "\n" not in err.message, name
        else:
            assert loaded.train, name


def test_datasets_from_llamafactorys_registry_validate(shared_data):
    datasets = "alpaca_en_demo,identity,glaive_toolcall_en_demo,kto_en_demo"
    validate(build_config({"model_name_or_path": "tiny-llama", "dataset": datasets,
                           "dataset_dir": str(shared_data / "llamafactory")}))


def test_llamafactory_dpo_demo_reads_as_pairs(shared_data):
    """dpo_en_demo (sharegpt, ranking): every record a prompt ending with the user's turn and two different
    replies, as LLaMA-Factory's pairwise processor reads it."""
    records = json.loads((shared_data / "llamafactory" / "dpo_en_demo.json").read_text())
    pairs = load_conversations("dpo_en_demo", str(shared_data / "llamafactory"), kind="pairs").train
    assert len(pairs) == len(records) == 300
    for record, pair in zip(records, pairs):
        assert pair["messages"][-1] == {"role": "user", "content": record["conversations"][-1]["value"]}
        assert (pair["chosen"], pair["rejected"]) == (record["chosen"]["value"], record["rejected"]["value"])


def test_llamafactory_c4_demo_reads_as_raw_text_for_stage_pt(shared_data):
    records = [json.loads(line) for line in (shared_data / "llamafactory" / "c4_demo.jsonl").read_text().splitlines()]
    texts = load_conversations("c4_demo", str(shared_data / "llamafactory"), kind="text").train
    assert [t["text"] for t in texts] == [r["text"] for r in records] and len(texts) == 300


def test_llamafactory_kto_demo_reads_as_judged_replies_for_stage_kto(shared_data):
    """kto_en_demo (sharegpt, kto_tag mapped to its label column): every record a conversation whose last reply is
    judged, as LLaMA-Factory's feedback processor reads it; supervised training keeps the desirable ones only."""
    records = json.loads((shared_data / "llamafactory" / "kto_en_demo.json").read_text())
    samples = load_conversations("kto_en_demo", str(shared_data / "llamafactory"), kind="feedback").train
    assert len(samples) == len(records) == 300
    for record, sample in zip(records, samples):
        assert sample["label"] is record["label"]
        assert sample["messages"][-1] == {"role": "assistant", "content": record["messages"][-1]["content"]}
    supervised = load_conversations("kto_en_demo", str(shared_data / "llamafactory")).train
    assert len(supervised) == sum(record["label"] for record in records) < 300
