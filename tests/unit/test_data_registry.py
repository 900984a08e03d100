"""The dataset registry: a dataset_info.json laid out as LLaMA-Factory's (tests/llamafactory_layout.py; the real one
is checked in tests/shared), the bundled entries, resolving names and paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.data import convert, dataset_names, load_conversations, load_registry, resolve_dataset
from engine.data.registry import BUNDLED_DIR, absolute_dataset_dir
from engine.errors import UserError

DEMOS = ["demo_alpaca", "demo_sharegpt", "demo_openai", "demo_pairs", "demo_feedback"]
COLUMNS_EXPECTED = "a mapping of column roles to column names"


def test_bundled_registry_has_the_demo_datasets():
    assert dataset_names(None) == DEMOS
    assert load_registry(None)["demo_openai"].location == str(BUNDLED_DIR / "demo_openai.jsonl")


def test_users_entry_wins_over_bundled_one(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"demo_alpaca": {"file_name": "mine.json"},
                                                            "extra": {"hf_hub_url": "org/extra"}}))
    registry = load_registry(str(tmp_path))
    assert registry["demo_alpaca"].location == str(tmp_path / "mine.json")
    assert list(registry) == [*DEMOS, "extra"]


def test_dataset_names_imports_nothing_heavy():
    code = ("import sys; from engine.data import dataset_names; dataset_names(None); "
            "print([m for m in ('datasets', 'pyarrow', 'torch', 'transformers') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_malformed_registry_names_file_line_and_column(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "a.json",}\n}')
    with pytest.raises(UserError) as err:
        load_registry(str(tmp_path))
    assert err.value.message == (f"{tmp_path / 'dataset_info.json'}: invalid JSON at line 2, column 31: "
                                 "Expecting property name enclosed in double quotes")


@pytest.mark.parametrize("data, says", [
    (b'{"caf\xe9": {"file_name": "a.json"}}', "is not UTF-8 text (byte 0xe9 at offset 5)"),
    (b'{"a": ' * 100_000, "nested too deeply to be a dataset registry")])
def test_a_registry_not_utf8_or_nested_without_end_is_one_line(tmp_path, data, says):
    (tmp_path / "dataset_info.json").write_bytes(data)
    with pytest.raises(UserError) as err:
        load_registry(str(tmp_path))
    assert says in str(err.value) and str(tmp_path / "dataset_info.json") in str(err.value)


def test_entry_without_a_source_says_which_keys_give_one(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"formatting": "alpaca"}}))
    with pytest.raises(UserError) as err:
        load_registry(str(tmp_path))
    assert err.value.message == f"{tmp_path / 'dataset_info.json'}: dataset 'a' has no source"
    assert "hf_hub_url" in err.value.hint and "file_name" in err.value.hint


@pytest.mark.parametrize(("entry", "problem"), [
    ({"file_name": "a.json", "columns": ["a"]}, f'"columns" must be {COLUMNS_EXPECTED}, got a list'),
    ({"file_name": "a.json", "columns": "x"}, f'"columns" must be {COLUMNS_EXPECTED}, got a string'),
    ({"file_name": "a.json", "columns": {"prompt": 3}}, '"prompt" in "columns" must be a column name (a string), got a '
                                                        'number (3)'),
    ({"file_name": "a.json", "tags": ["from"]}, '"tags" must be a mapping such as {"role_tag": "from", "content_tag": '
                                                '"value"}, got a list'),
    ({"file_name": "a.json", "tags": {"role_tag": None}}, '"role_tag" in "tags" must be a string, got null'),
    (3, 'expected a mapping such as {"file_name": "data.json"}, got a number (3)'),
    ({"file_name": 5}, '"file_name" must be a file or folder path (a string), got a number (5)'),
    ({"hf_hub_url": ["org/data"]}, '"hf_hub_url" must be a hub id or URL (a string), got a list'),
    ({"file_name": "a.json", "split": 1}, '"split" must be a split name such as train, got a number (1)'),
    ({"file_name": "a.json", "subset": ["en"]}, '"subset" must be a subset name (a string), got a list'),
    ({"file_name": "a.json", "folder": {}}, '"folder" must be a folder name (a string), got a mapping'),
    ({"file_name": "a.json", "formatting": True}, '"formatting" must be a string such as alpaca, sharegpt or openai, '
                                                  'got true'),
    ({"file_name": "a.json", "ranking": "yes"}, '"ranking" must be true or false, got a string'),
    ({"file_name": "a.json", "num_samples": "10"}, '"num_samples" must be a whole number of at least 1, got a string'),
])
def test_entry_field_of_the_wrong_type_names_file_entry_and_field(tmp_path, entry, problem):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"my_set": entry}))
    with pytest.raises(UserError) as err:
        load_registry(str(tmp_path))
    assert str(err.value) == f"{tmp_path / 'dataset_info.json'}: dataset 'my_set': {problem}"


def test_malformed_entry_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from engine.cli import main

    (tmp_path / "dataset_info.json").write_text(json.dumps({"my_set": {"file_name": "a.json", "columns": ["a"]}}))
    assert main(["datasets", "--dataset_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"tuner: error: {tmp_path / 'dataset_info.json'}: dataset 'my_set': "
                                       '"columns" must be a mapping of column roles to column names, got a list\n')


def test_null_and_empty_optional_fields_keep_their_meaning(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"my_set": {
        "file_name": "a.json", "formatting": None, "subset": None, "columns": {"prompt": "q", "query": None,
                                                                                  "response": ""}}}))
    attr = load_registry(str(tmp_path))["my_set"]
    assert (attr.formatting, attr.subset, attr.columns) == (None, None, {"prompt": "q"})


def test_unknown_name_lists_closest_names_first():
    with pytest.raises(UserError) as err:
        resolve_dataset("demo_alpacca", None)
    assert err.value.message == ("unknown dataset 'demo_alpacca'; closest registered names: "
                                 "demo_alpaca, demo_pairs, demo_openai, demo_sharegpt, demo_feedback (5 registered)")
    assert "dataset_info.json" in err.value.hint


def test_local_paths_resolve_absolute_or_under_dataset_dir(tmp_path):
    (tmp_path / "mine.jsonl").write_text("")
    for name, dataset_dir in ((str(tmp_path / "mine.jsonl"), None), ("mine.jsonl", str(tmp_path))):
        resolved = resolve_dataset(name, dataset_dir)
        assert (resolved.load_from, resolved.location, resolved.formatting) == (
            "file", str(tmp_path / "mine.jsonl"), None)
    assert resolve_dataset(str(tmp_path), None).location == str(tmp_path)


def test_missing_local_file_names_the_paths_tried(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_dataset("data/train.json", str(tmp_path))
    assert err.value.message == (f"dataset file not found: data/train.json "
                                 f"(tried data/train.json, {tmp_path / 'data/train.json'})")


def test_unregistered_name_with_slash_is_a_hub_id():
    resolved = resolve_dataset("someone/some_data", None)
    assert (resolved.load_from, resolved.location, resolved.formatting) == ("hf_hub", "someone/some_data", None)


def test_hub_dataset_offline_fails_in_one_clear_line(llamafactory_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError) as err:
        load_conversations("alpaca_en", str(llamafactory_data))
    assert err.value.message == ("dataset 'alpaca_en' needs the Hugging Face hub (llamafactory/alpaca_en), "
                                 "which cannot be reached")
    assert err.value.hint.startswith("download it while online")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("name", "where"), [("deepctrl", "the ModelScope hub (deepctrl/deepctrl-sft-data)")])
def test_unsupported_sources_fail_only_when_used(llamafactory_data, name, where):
    with pytest.raises(UserError) as err:
        load_conversations(name, str(llamafactory_data))
    assert err.value.message == f"dataset '{name}' is loaded from {where}, which is not supported"


def test_script_and_cloud_sources_are_not_supported(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "scripted": {"script_url": "my_script"}, "cloud": {"cloud_file_name": "s3://bucket/data.json"}}))
    with pytest.raises(UserError, match="'scripted' is loaded from a loading script"):
        load_conversations("scripted", str(tmp_path))
    with pytest.raises(UserError, match="'cloud' is loaded from a cloud file"):
        load_conversations("cloud", str(tmp_path))


def test_registered_file_that_is_absent_names_the_path(llamafactory_data):
    with pytest.raises(UserError) as err:
        load_conversations("alpaca_zh_demo", str(llamafactory_data))
    assert err.value.message == ("dataset 'alpaca_zh_demo': file not found: "
                                 f"{(llamafactory_data / 'alpaca_zh_demo.json').resolve()}")


def _refusal(attr) -> str:
    """What the entry alone says about a dataset: understood, or the reason it is refused when used."""
    try:
        convert([], attr)
    except UserError as err:
        return err.message.removeprefix(f"dataset '{attr.name}' ")
    return "understood"


def test_default_dataset_dir_that_does_not_exist_still_finds_demos_files_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    assert dataset_names("data") == DEMOS
    assert len(load_conversations("demo_alpaca", "data").train) == 400
    assert load_conversations(str(tmp_path / "mine.jsonl"), "data").train[0]["messages"][1]["content"] == "b"
    assert load_conversations("mine.jsonl", "data").report.train[0].kept == 1
    assert resolve_dataset("someone/some_data", "data").load_from == "hf_hub"


def test_unknown_name_says_when_dataset_dir_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        resolve_dataset("my_set", "data")
    assert err.value.message == ("unknown dataset 'my_set'; closest registered names: demo_sharegpt, demo_pairs, "
                                 "demo_openai, demo_alpaca, demo_feedback (5 registered; dataset_dir data does not "
                                 "exist)")
    assert err.value.hint.endswith("; or set dataset_dir to the folder that holds your dataset_info.json")
    (tmp_path / "data").mkdir()
    (tmp_path / "file").write_text("")
    for dataset_dir, why in (("data", "has no dataset_info.json"), ("file", "is not a folder")):
        with pytest.raises(UserError) as err:
            resolve_dataset("my_set", dataset_dir)
        assert err.value.message.endswith(f"(5 registered; dataset_dir {dataset_dir} {why})")


def test_config_with_the_default_dataset_dir_validates_where_there_is_no_data_folder(tmp_path, monkeypatch):
    from engine.config.schema import build_config
    from engine.config.validation import validate

    monkeypatch.chdir(tmp_path)
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca,demo_openai"})
    assert cfg.data.dataset_dir == "data"
    validate(cfg)


def test_online_dataset_dir_reads_no_registry_and_takes_names_as_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ONLINE").mkdir()
    (tmp_path / "ONLINE" / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    assert dataset_names("ONLINE") == DEMOS
    assert resolve_dataset("demo_openai", "ONLINE").load_from == "file"
    for name in ("mine", "someone/some_data"):
        resolved = resolve_dataset(name, "ONLINE")
        assert (resolved.load_from, resolved.location, resolved.formatting) == ("hf_hub", name, None)
    assert absolute_dataset_dir("ONLINE") == "ONLINE"


def test_remote_dataset_dir_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        load_registry("REMOTE:someone/registry")
    assert err.value.message == ("dataset_dir REMOTE:someone/registry: a dataset_info.json read from the hub is not "
                                 "supported")
    assert "ONLINE" in err.value.hint


def test_absolute_dataset_dir_for_a_saved_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_dataset_dir("data") == str(tmp_path / "data")
    assert (absolute_dataset_dir(None), absolute_dataset_dir("")) == (None, None)


def test_reads_a_llamafactory_registry_as_it_is(llamafactory_data):
    from llamafactory_layout import MIRRORED, OURS

    registry = load_registry(str(llamafactory_data))
    assert len(registry) == len(MIRRORED) + len(OURS) + len(DEMOS)
    assert dataset_names(str(llamafactory_data))[:len(DEMOS)] == DEMOS

    demo = registry["alpaca_en_demo"]
    assert (demo.load_from, demo.formatting) == ("file", "alpaca")
    assert demo.location == str((llamafactory_data / "alpaca_en_demo.json").resolve())
    assert demo.columns == {"prompt": "instruction", "query": "input", "response": "output"}

    ultrachat = registry["ultrachat_200k"]
    assert (ultrachat.load_from, ultrachat.location, ultrachat.split) == (
        "hf_hub", "HuggingFaceH4/ultrachat_200k", "train_sft")
    assert ultrachat.tags["role_tag"] == "role" and ultrachat.tags["system_tag"] == "system"
    assert registry["openorca"].columns == {"prompt": "question", "response": "response", "system": "system_prompt"}
    assert registry["deepctrl"].load_from == "ms_hub"
    assert registry["llava_1k_en"].subset == "en"
    assert registry["starcoder_python"].folder == "python"
    assert registry["dpo_en_demo"].ranking is True


def refusal(attr) -> str:
    """What the entry alone says about a dataset: understood, or the reason it is refused when used."""
    try:
        convert([], attr)
    except UserError as err:
        return err.message.removeprefix(f"dataset '{attr.name}' ")
    return "understood"


def test_each_kind_of_llamafactory_entry_is_understood_or_refused_with_a_reason(llamafactory_data):
    refusals = {name: refusal(attr) for name, attr in load_registry(str(llamafactory_data)).items()}
    assert refusals["mllm_video_audio_demo"] == "is multimodal (videos, audios), which is not supported"
    assert refusals["llava_1k_en"] == "is multimodal (images), which is not supported"
    assert refusals["c4_demo"] == ("maps no response column (it maps prompt=text): plain text, for pre-training; set "
                                   "stage pt to train on it")
    assert refusals["starcoder_python"].startswith("maps no response column")
    assert refusals["dpo_en_demo"] == "is a preference (ranking) dataset for DPO / reward modelling"
    for name in ("glaive_toolcall_en_demo", "kto_en_demo", "ultrachat_200k", "alpaca_en", "openorca", "openai_demo",
                 "sharegpt_demo", "identity", "alpaca_en_demo"):
        assert refusals[name] == "understood", name


def test_text_sft_files_of_a_llamafactory_registry_load_end_to_end(llamafactory_data):
    loaded = load_conversations("alpaca_en_demo,identity,sharegpt_demo,openai_demo", str(llamafactory_data))
    assert [(report.name, report.records, report.kept, report.dropped) for report in loaded.report.train] == [
        ("alpaca_en_demo", 40, 40, {}), ("identity", 16, 16, {}), ("sharegpt_demo", 6, 6, {}), ("openai_demo", 6, 6, {})]
    assert len(loaded.train) == 40 + 16 + 6 + 6
    assert all(conversation["tools"] == "" for conversation in loaded.train)
    assert loaded.train[56]["messages"][0] == {"role": "system", "content": "You count."}
    assert [m["role"] for m in loaded.train[-1]["messages"]] == ["system", "user", "assistant"]


def test_each_entry_says_which_stage_trains_on_it(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"c4": {"file_name": "c4.jsonl",
                                                                   "columns": {"prompt": "text"}}}))
    registry = load_registry(str(tmp_path))
    assert [registry[name].kind for name in ("demo_alpaca", "demo_sharegpt", "demo_pairs", "demo_feedback", "c4")] == [
        "conversations", "conversations", "pairs", "feedback", "text"]
