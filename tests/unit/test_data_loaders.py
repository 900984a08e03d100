"""Loading conversations: every file type, folders, several datasets, caps, eval splits and precise errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from engine.data import load_conversations, split_eval
from engine.errors import UserError


ALPACA = [{"instruction": "Reverse: ab", "input": "", "output": "ba"},
          {"instruction": "Add", "input": "1 2", "output": "3"}]
ALPACA_MESSAGES = [
    {"messages": [{"role": "user", "content": "Reverse: ab"}, {"role": "assistant", "content": "ba"}], "tools": ""},
    {"messages": [{"role": "user", "content": "Add\n1 2"}, {"role": "assistant", "content": "3"}], "tools": ""},
]
SHAREGPT = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "S"}]
OPENAI = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
OPENAI_MESSAGES = [{**OPENAI[0], "tools": ""}]


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_csv(path: Path, records: list[dict]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("writer", [write_json, write_jsonl, write_csv, write_parquet])
def test_alpaca_from_every_file_type(tmp_path, writer):
    suffix = {write_json: ".json", write_jsonl: ".jsonl", write_csv: ".csv", write_parquet: ".parquet"}[writer]
    path = writer(tmp_path / f"data{suffix}", ALPACA)
    loaded = load_conversations(str(path), None)
    assert loaded.train == ALPACA_MESSAGES
    assert loaded.eval is None
    assert loaded.report.lines() == [f"{path}: 2 conversations (alpaca, {path})"]


def test_sharegpt_and_openai_from_parquet_keep_nested_messages(tmp_path):
    sharegpt = load_conversations(str(write_parquet(tmp_path / "s.parquet", SHAREGPT)), None)
    assert sharegpt.train == [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}], "tools": ""}]
    assert load_conversations(str(write_parquet(tmp_path / "o.parquet", OPENAI)), None).train == OPENAI_MESSAGES


def test_json_lines_inside_a_json_file(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ALPACA)
    assert load_conversations(str(path), None).train == ALPACA_MESSAGES


def test_folder_of_every_file_type_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ALPACA[1:])
    write_json(tmp_path / "a.json", ALPACA)
    write_csv(tmp_path / "c.csv", ALPACA[:1])
    write_parquet(tmp_path / "d.parquet", ALPACA[1:])
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_conversations(str(tmp_path), None)
    assert loaded.train == ALPACA_MESSAGES + ALPACA_MESSAGES[1:] + ALPACA_MESSAGES[:1] + ALPACA_MESSAGES[1:]


def test_registered_local_dataset_with_columns_and_tags(tmp_path):
    write_json(tmp_path / "chat.json", [{"dialog": [{"speaker": "me", "text": "a"}, {"speaker": "bot", "text": "b"}]}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {
        "file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}}}))
    assert load_conversations("chat", str(tmp_path)).train == [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": ""}]


def test_several_datasets_by_comma_each_capped_by_max_samples(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    write_jsonl(tmp_path / "o.jsonl", OPENAI * 3)
    loaded = load_conversations("a.json, o.jsonl", str(tmp_path), max_samples=1)
    assert loaded.train == ALPACA_MESSAGES[:1] + OPENAI_MESSAGES
    assert [report.records for report in loaded.report.train] == [1, 1]


def test_eval_dataset_is_loaded_separately(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    write_jsonl(tmp_path / "o.jsonl", OPENAI)
    loaded = load_conversations("a.json", str(tmp_path), eval_dataset="o.jsonl")
    assert (loaded.train, loaded.eval) == (ALPACA_MESSAGES, OPENAI_MESSAGES)
    assert loaded.report.lines()[1] == f"eval o.jsonl: 1 conversation (openai, {tmp_path / 'o.jsonl'})"
    with pytest.raises(UserError, match="either val_size or eval_dataset"):
        load_conversations("a.json", str(tmp_path), eval_dataset="o.jsonl", val_size=0.5)


def test_dropped_samples_are_reported_by_reason(tmp_path):
    records = ALPACA + [{"instruction": "x", "input": "", "output": ""}] * 3
    path = write_json(tmp_path / "d.json", records)
    loaded = load_conversations(str(path), None)
    assert loaded.report.train[0].dropped == {"empty output": 3}
    assert loaded.report.lines() == [f"{path}: 2 conversations (alpaca, {path}); dropped 3 samples with empty output"]


def test_num_samples_draws_seeded_and_tops_up_with_replacement(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json", "num_samples": 5}}))
    first = load_conversations("a", str(tmp_path)).train
    assert len(first) == 5 and first == load_conversations("a", str(tmp_path)).train
    assert first[:2] in (ALPACA_MESSAGES, ALPACA_MESSAGES[::-1])


def test_split_in_the_registry_takes_part_of_a_local_file_as_datasets_would(tmp_path):
    """LLaMA-Factory passes ``split`` to ``datasets.load_dataset``; a local file is one split, train, to slice."""
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    write_json(tmp_path / "a.json", records)
    for split, kept in (("train", range(10)), ("train[:4]", range(4)), ("train[10%:30%]", [1, 2]),
                        ("train[:1]+train[-1:]", [0, 9])):
        (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json", "split": split}}))
        train = load_conversations("a", str(tmp_path)).train
        assert [c["messages"][0]["content"] for c in train] == [f"q{i}" for i in kept], split
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json", "split": "test"}}))
    said = """dataset 'a': split 'test': Unknown split "test". Should be one of ['train']. (a local file holds one"""
    with pytest.raises(UserError, match=re.escape(said)):
        load_conversations("a", str(tmp_path))


def test_llamafactory_alpaca_file_loads_caps_and_splits(llamafactory_data):
    dataset_dir = str(llamafactory_data)
    full = load_conversations("alpaca_en_demo", dataset_dir)
    assert len(full.train) == 40
    first = json.loads((llamafactory_data / "alpaca_en_demo.json").read_text())[0]
    assert full.train[0]["messages"] == [{"role": "user", "content": f"{first['instruction']}\n{first['input']}"},
                                         {"role": "assistant", "content": first["output"]}]
    assert len(load_conversations("alpaca_en_demo", dataset_dir, max_samples=10).train) == 10

    split = load_conversations("alpaca_en_demo", dataset_dir, val_size=0.1, seed=7)
    assert (len(split.train), len(split.eval)) == (36, 4)
    assert split.report.split == "split off 4 of 40 for evaluation (val_size=0.1, seed=7)"
    counted = load_conversations("alpaca_en_demo", dataset_dir, max_samples=20, val_size=5)
    assert (len(counted.train), len(counted.eval)) == (15, 5)


def test_placeholders_as_in_llamafactorys_identity_are_warned_about_once(llamafactory_data):
    path = llamafactory_data / "identity.json"
    records = json.loads(path.read_text())
    loaded = load_conversations("identity", str(llamafactory_data))
    assert len(loaded.train) == len(records) == 16
    assert loaded.train[0] == {"messages": [
        {"role": "user", "content": records[0]["instruction"]},
        {"role": "assistant", "content": records[0]["output"]}], "tools": ""}
    assert loaded.report.lines() == [
        f"identity: 16 conversations (alpaca, {path.resolve()})",
        f"warning: identity: 3 of 16 conversations hold the placeholders {{{{name}}}}, {{{{author}}}}: "
        f"replace them in {path.resolve()} with your own text before training"]


def test_placeholder_warning_follows_its_dataset_also_for_eval(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    write_json(tmp_path / "p.json", [{"instruction": "Who are you?", "output": "I am {{name}}, by {{ author }}."}])
    loaded = load_conversations("a.json", str(tmp_path), eval_dataset="p.json")
    assert loaded.report.lines()[1:] == [
        f"eval p.json: 1 conversation (alpaca, {tmp_path / 'p.json'})",
        f"warning: eval p.json: 1 of 1 conversations hold the placeholders {{{{name}}}}: replace them in "
        f"{tmp_path / 'p.json'} with your own text before training"]
    assert len(load_conversations("a.json", str(tmp_path)).report.lines()) == 1


def test_split_eval_is_deterministic_by_seed_and_keeps_order():
    items = [{"i": i} for i in range(10)]
    train, evaluation = split_eval(items, 0.3, seed=1)
    assert (train, evaluation) == split_eval(items, 0.3, seed=1)
    assert len(evaluation) == 3 and sorted(train + evaluation, key=lambda item: item["i"]) == items
    assert train == sorted(train, key=lambda item: item["i"])
    assert split_eval(items, 0.3, seed=2) != (train, evaluation)


@pytest.mark.parametrize(("val_size", "message"), [
    (10, "val_size=10 takes 10 of 10 conversations for evaluation, leaving none to train on"),
    (2.5, "val_size=2.5 is neither a fraction between 0 and 1 nor a whole count"),
    (-0.1, "val_size=-0.1 is neither a fraction between 0 and 1 nor a whole count"),
])
def test_bad_val_size(val_size, message):
    with pytest.raises(UserError) as err:
        split_eval([{}] * 10, val_size, seed=0)
    assert err.value.message == message


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(UserError) as err:
        load_conversations(str(path), None)
    assert err.value.message == f"{path}: invalid JSON at line 3, column 23: Expecting ',' delimiter"


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(UserError) as err:
        load_conversations(str(path), None)
    assert err.value.message == f"{path}: invalid JSON at line 3, column 32: Expecting value"


def test_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[{"instruction": "a", "output": "b"}, ["c", "d"]]')
    with pytest.raises(UserError) as err:
        load_conversations(str(path), None)
    assert err.value.message == f"{path}: record 1 is a list, not a JSON object"


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    write_json(tmp_path / "q.json", [{"question": "a", "answer": "b"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"q": {"file_name": "q.json"}}))
    with pytest.raises(UserError) as err:
        load_conversations("q", str(tmp_path))
    assert err.value.message == "dataset 'q' has no column 'instruction' (sample 0 has: question, answer)"


def test_empty_dataset_says_which(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError) as err:
        load_conversations(f"{write_json(tmp_path / 'a.json', ALPACA)},{path}", None)
    assert err.value.message == f"dataset '{path}' is empty ({path})"


def test_dataset_where_every_sample_is_dropped_says_why(tmp_path):
    path = write_json(tmp_path / "e.json", [{"instruction": "a", "output": ""}, {"instruction": "", "output": "b"}])
    with pytest.raises(UserError) as err:
        load_conversations(str(path), None)
    assert err.value.message == (f"dataset '{path}' has no usable samples: all 2 were dropped "
                                 "(1 with empty output, 1 with empty instruction)")


def test_sharegpt_turn_order_error_from_a_file(tmp_path):
    bad = [{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}]
    with pytest.raises(UserError) as err:
        load_conversations(str(write_json(tmp_path / "s.json", SHAREGPT + bad)), None)
    assert err.value.message == (f"dataset '{tmp_path / 's.json'}', sample 1, message 1: "
                                 "role 'human' where the assistant tag 'gpt' or the function tag 'function_call' "
                                 "was expected")


def test_unknown_formatting_in_registry_lists_valid_ones(tmp_path):
    write_json(tmp_path / "a.json", ALPACA)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json", "formatting": "chatml"}}))
    with pytest.raises(UserError) as err:
        load_conversations("a", str(tmp_path))
    assert str(err.value) == "dataset 'a': unknown formatting 'chatml' (valid formattings: alpaca, sharegpt, openai)"


def test_missing_file_in_folder_and_unsupported_type(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_conversations(str(tmp_path / "empty"), None)
    assert err.value.message == (f"dataset '{tmp_path / 'empty'}': folder {tmp_path / 'empty'} has no "
                                 ".json, .jsonl, .csv, .parquet, .txt files")
    (tmp_path / "wiki.xml").write_text("text")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"wiki": {"file_name": "wiki.xml"}}))
    with pytest.raises(UserError) as err:
        load_conversations("wiki", str(tmp_path))
    assert err.value.message == f"{tmp_path / 'wiki.xml'}: unsupported file type '.xml'"
