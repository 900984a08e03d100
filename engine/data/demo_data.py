"""The bundled demo datasets, generated from simple regular tasks a tiny model learns in a few CPU minutes.

The files in ``presets/data/`` are this module's output (a test checks they match); regenerate them with
``python3 -m engine.data.demo_data``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from engine.paths import PRESETS_DIR

SEED = 1234
WORDS = ["apple", "river", "stone", "cloud", "tiger", "bread", "house", "light", "green", "music", "chair", "ocean",
         "plant", "water", "sugar", "horse", "train", "paper", "smile", "candle", "garden", "pencil", "window",
         "rabbit", "orange", "butter", "summer", "winter", "forest", "silver", "cat", "dog", "sun", "moon", "fish",
         "bird", "tree", "book", "lamp", "rain", "snow", "fire", "milk", "door", "ship", "road", "star", "frog"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
            "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
            "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima", "Chile": "Santiago",
            "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
            "Austria": "Vienna", "Ireland": "Dublin", "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Australia": "Canberra", "Argentina": "Buenos Aires",
            "Cuba": "Havana"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "light": "dark",
             "happy": "sad", "open": "closed", "early": "late", "full": "empty", "high": "low", "hard": "soft",
             "left": "right", "wet": "dry", "loud": "quiet", "rich": "poor", "strong": "weak", "thick": "thin",
             "clean": "dirty", "near": "far", "long": "short", "first": "last", "win": "lose", "push": "pull"}

REGISTRY = {
    "demo_alpaca": {"file_name": "demo_alpaca.json"},
    "demo_sharegpt": {"file_name": "demo_sharegpt.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "system": "system"}},
    "demo_openai": {"file_name": "demo_openai.jsonl", "formatting": "openai"},
    "demo_pairs": {"file_name": "demo_pairs.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "demo_feedback": {"file_name": "demo_feedback.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "kto_tag": "label"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
}


def write_demo_datasets(out_dir: str | Path) -> list[Path]:
    """Write the demo datasets and their dataset_info.json into out_dir (a ready dataset_dir)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng, pairs_rng = random.Random(SEED), random.Random(SEED + 1)  # the pairs apart: the older files stay as they were
    feedback_rng = random.Random(SEED + 2)
    files = {
        "demo_alpaca.json": _pretty_json([alpaca_record(rng) for _ in range(400)]),
        "demo_sharegpt.json": _pretty_json([sharegpt_record(rng) for _ in range(200)]),
        "demo_openai.jsonl": "".join(json.dumps(openai_record(rng)) + "\n" for _ in range(200)),
        "demo_pairs.json": _pretty_json([pair_record(pairs_rng) for _ in range(300)]),
        "demo_feedback.json": _pretty_json([feedback_record(feedback_rng) for _ in range(300)]),
        "dataset_info.json": _pretty_json(REGISTRY),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]


def alpaca_record(rng: random.Random) -> dict:
    """One single-turn task; some put the word in the input column, as alpaca data does."""
    word, a, b = rng.choice(WORDS), rng.randint(2, 49), rng.randint(2, 49)
    country = rng.choice(list(CAPITALS))
    tasks = [
        (f"Reverse the word: {word}", "", word[::-1]),
        ("Reverse the word.", word, word[::-1]),
        (f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}."),
        (f"What is {max(a, b)} - {min(a, b)}?", "", f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}."),
        (f"What is the capital of {country}?", "", f"The capital of {country} is {CAPITALS[country]}."),
        (f"Spell '{word}' letter by letter.", "", "-".join(word)),
        ("Write the word in capital letters.", word, word.upper()),
        (f"How many letters are in '{word}'?", "", f"'{word}' has {len(word)} letters."),
    ]
    instruction, query, output = rng.choice(tasks)
    return {"instruction": instruction, "input": query, "output": output}


REFUSALS = ["I cannot help with that.", "I don't know.", "Ask someone else.", "That is not something I answer."]


def pair_record(rng: random.Random) -> dict:
    """One of demo_alpaca's tasks with two replies: the right answer in the data's form, chosen; and, rejected,
    half the time a refusal and half the time a wrong answer in the same form (a preference for helpful, then for
    right answers, which a tiny model shows within a minute of DPO)."""
    record = alpaca_record(rng)
    right = record.pop("output")
    if rng.random() < 0.5:
        wrong = rng.choice(REFUSALS)
    else:
        wrong = _wrong(right, rng)
    return {**record, "chosen": right, "rejected": wrong}


def feedback_record(rng: random.Random) -> dict:
    """One of demo_pairs' pairs as LLaMA-Factory's kto_en_demo holds a sample: the conversation with one of the two
    replies, and its label (kto_tag): true for the right answer, false for the refusal or wrong answer."""
    pair = pair_record(rng)
    desirable = rng.random() < 0.5
    question = "\n".join(text for text in (pair["instruction"], pair["input"]) if text)
    reply = pair["chosen"] if desirable else pair["rejected"]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "label": desirable}


def _wrong(right: str, rng: random.Random) -> str:
    """``right`` with its answer changed, in the same form: another capital, a number off by a little, another
    word's letters."""
    for country, capital in CAPITALS.items():
        if right == f"The capital of {country} is {capital}.":
            return f"The capital of {country} is {rng.choice([c for c in CAPITALS.values() if c != capital])}."
    numbers = [word for word in right.replace(".", " ").split() if word.isdigit()]
    if numbers:
        wrong = int(numbers[-1]) + rng.choice([-3, -2, -1, 1, 2, 3])
        head, _, tail = right.rpartition(numbers[-1])
        return f"{head}{wrong}{tail}"
    other = rng.choice([word for word in WORDS if word not in right.lower() and word[::-1] not in right.lower()])
    if "-" in right:
        return "-".join(other)
    return other.upper() if right.isupper() else other[::-1]


def sharegpt_record(rng: random.Random) -> dict:
    """Two or three exchanges on one theme under a system prompt that states the rule."""
    theme = rng.choice(["calculator", "reverser", "geography", "opposites"])
    turns, asked = [], set()
    exchanges = rng.randint(2, 3)
    while len(asked) < exchanges:
        if theme == "calculator":
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            question, answer = f"{a} + {b}", str(a + b)
        elif theme == "reverser":
            word = rng.choice(WORDS)
            question, answer = word, word[::-1]
        elif theme == "geography":
            country = rng.choice(list(CAPITALS))
            question, answer = f"Capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
        else:
            word = rng.choice(list(OPPOSITES))
            question, answer = word, OPPOSITES[word]
        if question in asked:
            continue
        asked.add(question)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    system = {"calculator": "You are a calculator. Reply with the sum only.",
              "reverser": "You reverse every word you are given.",
              "geography": "You answer questions about capitals in one sentence.",
              "opposites": "You reply with the opposite of the word you are given."}[theme]
    return {"conversations": turns, "system": system}


def openai_record(rng: random.Random) -> dict:
    """A question and a short answer, half of them under a system prompt."""
    word, a, b = rng.choice(WORDS), rng.randint(2, 12), rng.randint(2, 12)
    opposite = rng.choice(list(OPPOSITES))
    question, answer = rng.choice([
        (f"Spell '{word}' letter by letter.", "-".join(word)),
        (f"What is {a} times {b}?", f"{a} x {b} = {a * b}."),
        (f"What is the opposite of '{opposite}'?", f"The opposite of '{opposite}' is '{OPPOSITES[opposite]}'."),
        (f"What is the last letter of '{word}'?", f"The last letter of '{word}' is '{word[-1]}'."),
    ])
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer briefly."})
    return {"messages": messages}


def _pretty_json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    for path in write_demo_datasets(PRESETS_DIR / "data"):
        print(path)
