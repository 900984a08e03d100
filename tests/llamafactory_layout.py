"""A data folder laid out as LLaMA-Factory's `data/`, written by the tests themselves: a dataset_info.json whose
entries have the shapes of LLaMA-Factory's (file, hub, ModelScope, multimodal, preference, KTO, tool-call, raw text)
and small files of our own for the file entries. The default suite reads this; tests/shared checks the same entries
against LLaMA-Factory's real registry (MIRRORED there must equal theirs)."""

from __future__ import annotations

import json
from pathlib import Path

ROLE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}

# Entries as LLaMA-Factory's registry writes them; the file entries' files are written below.
MIRRORED = {
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "identity": {"file_name": "identity.json"},
    "alpaca_zh_demo": {"file_name": "alpaca_zh_demo.json"},  # registered, its file absent (as here)
    "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"}, "tags": ROLE_TAGS},
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en",
                  "om_hub_url": "HaM/alpaca_en"},
    "deepctrl": {"ms_hub_url": "deepctrl/deepctrl-sft-data"},
    "ultrachat_200k": {"hf_hub_url": "HuggingFaceH4/ultrachat_200k", "ms_hub_url": "AI-ModelScope/ultrachat_200k",
                       "split": "train_sft", "formatting": "sharegpt", "columns": {"messages": "messages"},
                       "tags": ROLE_TAGS},
    "openorca": {"hf_hub_url": "Open-Orca/OpenOrca", "ms_hub_url": "AI-ModelScope/OpenOrca",
                 "columns": {"prompt": "question", "response": "response", "system": "system_prompt"}},
    "mllm_video_audio_demo": {"file_name": "mllm_video_audio_demo.json", "formatting": "sharegpt",
                              "columns": {"messages": "messages", "videos": "videos", "audios": "audios"},
                              "tags": ROLE_TAGS},
    "llava_1k_en": {"hf_hub_url": "BUAADreamer/llava-en-zh-2k", "subset": "en", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images"}, "tags": ROLE_TAGS},
    "starcoder_python": {"hf_hub_url": "bigcode/starcoderdata", "ms_hub_url": "AI-ModelScope/starcoderdata",
                         "columns": {"prompt": "content"}, "folder": "python"},
}
# Formats LLaMA-Factory has no demo file of: an openai-style messages file and a sharegpt one with a system column.
OURS = {
    "openai_demo": {"file_name": "openai_demo.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                    "tags": {**ROLE_TAGS, "system_tag": "system"}},
    "sharegpt_demo": {"file_name": "sharegpt_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "system": "system"}},
}

ALPACA_SAMPLES = 40
IDENTITY = [
    {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an assistant made by {{author}}."},
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, trained by {{author}}."},
    {"instruction": "What is your name?", "input": "", "output": "My name is {{name}}."},
    {"instruction": "Can you help me?", "input": "", "output": "Of course. What do you need?"},
] + [{"instruction": f"Tell me fact {n}.", "input": "", "output": f"Fact {n}: {n} is {n}."} for n in range(12)]
AREA = {"name": "calculate_area", "description": "The area of a shape",
        "parameters": {"type": "object", "properties": {"shape": {"type": "string"},
                                                        "dimensions": {"type": "array", "items": {"type": "number"}}},
                       "required": ["shape", "dimensions"]}}
GLAIVE = [
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "2 + 3 = 5."}],
     "tools": "[]"},
    {"conversations": [
        {"from": "human", "value": "The area of a 5 by 3 rectangle?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_area",
                                                        "arguments": {"shape": "rectangle", "dimensions": [5, 3]}})},
        {"from": "observation", "value": '{"area": 15}'},
        {"from": "gpt", "value": "It is 15 square units."}],
     "tools": json.dumps([AREA])},
]
DPO = [{"conversations": [{"from": "human", "value": f"Say {word}."}],
        "chosen": {"from": "gpt", "value": f"{word.capitalize()}."},
        "rejected": {"from": "gpt", "value": "No."}} for word in ("yes", "maybe", "hello")]
KTO = [{"messages": [{"role": "user", "content": f"Is {n} even?"},
                     {"role": "assistant", "content": "yes" if n % 2 == 0 else "no"}], "label": n % 3 != 0}
       for n in range(1, 7)]
C4 = [{"text": f"Plain text number {n} for pre-training, with no prompt and no reply."} for n in range(5)]
OPENAI = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{n} + 1?"},
                        {"role": "assistant", "content": f"{n + 1}."}]} for n in range(6)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Count to {n}."},
                               {"from": "gpt", "value": " ".join(str(i) for i in range(1, n + 1))}],
             "system": "You count."} for n in range(1, 7)]


def alpaca_records(count: int = ALPACA_SAMPLES) -> list[dict]:
    """Arithmetic in the alpaca form, half of them with an input."""
    return [{"instruction": f"What is {n} + {n * 3 % 7}?" if n % 2 else "Add the numbers.",
             "input": "" if n % 2 else f"{n} {n * 3 % 7}", "output": f"{n + n * 3 % 7}."} for n in range(count)]


def write_llamafactory_data(folder: Path) -> Path:
    """Write the registry and its files into ``folder`` (made if missing); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps({**MIRRORED, **OURS}, indent=2))
    files = {"alpaca_en_demo.json": alpaca_records(), "identity.json": IDENTITY, "glaive_toolcall_en_demo.json": GLAIVE,
             "dpo_en_demo.json": DPO, "kto_en_demo.json": KTO, "sharegpt_demo.json": SHAREGPT}
    for name, records in files.items():
        (folder / name).write_text(json.dumps(records, indent=2))
    for name, records in {"c4_demo.jsonl": C4, "openai_demo.jsonl": OPENAI}.items():
        (folder / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder
