"""Built-in demo models: tiny Llama, Mistral and Mixtral with random weights and a small byte-level BPE tokenizer.

They need no download, build in about a second and train on a CPU, so tests, tutorials and a first try of the whole
pipeline work anywhere. Their geometry and default template are their entries in presets/models.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from engine.models.catalog import lookup
from engine.errors import UserError
from engine.paths import cache_dir
from engine.templates import get_template, to_chat_template

DEMO_MODELS = ("tiny-llama", "tiny-mistral", "tiny-mixtral")
RECIPE_VERSION = 1  # bump when _build changes in a way the fingerprint cannot see
MARKER = "tuner-demo.json"
SEED = 0
TOKENIZER_VOCAB = 1024  # asked of the BPE trainer; the model's vocab_size is len(tokenizer) after training

# Special tokens: the usual four (a real <pad>, so padding never hides an </s> the model must learn), then the chat
# markers of the chatml/qwen, llama3 and gemma templates, so those render to single tokens on a demo model too.
# decode(skip_special_tokens=True) drops them all.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>",
]
# Llama 2 / Mistral prompt markers: single tokens that still decode as text, as in the Llama 2 and Mistral v0.1
# tokenizers where they are plain text (Mistral v0.3 made [INST] a control token).
TEXT_MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]

# The text the tokenizer learns its merges from: plain English, numbers, punctuation and a little code and markup,
# so common words become single tokens. Any other text still tokenizes, byte by byte.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model is a good way to learn how training works: it runs on
any computer, it finishes in seconds, and every step can be watched. When you understand the small one, the large
one holds few surprises.

Question: What is the capital of France?
Answer: The capital of France is Paris. It lies on the river Seine and has about 2.1 million people.

Question: How many days are there in a week?
Answer: There are 7 days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.

Instruction: Write a short note to a friend about the weather.
Response: Hi Sam! It rained all morning, but the sun came out at 3 pm and the sky is clear now. We could walk to the
park tomorrow if it stays dry. Talk soon, Alex.

Instruction: Summarize the following text in one sentence.
Input: The library will close early on Friday because the heating system needs repairs. It opens again on Monday.
Response: The library closes early on Friday for heating repairs and reopens on Monday.

User: Can you help me plan a trip?
Assistant: Of course. Where would you like to go, for how many days, and what is your budget?
User: Three days in the mountains, about 500 dollars.
Assistant: Here is a simple plan. Day 1: travel and a short walk near the village. Day 2: a long hike to the lake,
with lunch by the water. Day 3: visit the market, then go home in the afternoon. Keep some money for food and fuel.

System: You are a helpful assistant. Answer briefly and politely.
User: Thank you for your help!
Assistant: You are welcome. Have a nice day!

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 32 50 64 100 128 256 512 1000 1024 2048 4096 2024 2025.
Prices: $4.99, $10.50, 12%, 3/4 of a cup, 1,250 km, 98.6 degrees, 6:30 am, 11:45 pm, 1st, 2nd, 3rd, 4th.
Math: 2 + 2 = 4; 10 - 3 = 7; 6 * 7 = 42; 81 / 9 = 9; (3 + 5) * 2 = 16; x^2 + y^2 = z^2; 1e-4; 3.14159.

Punctuation: commas, periods. Questions? Answers! "Quotes" and 'single quotes'; colons: semicolons; dashes - and
hyphen-joined words; (parentheses) [brackets] {braces} <angles>; slashes / and \\ backslashes; @ # % & * _ = + ~ ` |.

def add(a, b):
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b

for i in range(10):
    print(i, add(i, 1))

{"name": "tiny", "layers": 2, "heads": 4, "ok": true, "tags": ["demo", "test"]}
<html><body><p>Hello, world!</p></body></html>
SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY name;

The history of writing begins with marks on clay and stone. Over thousands of years people learned to record
trade, laws, stories and songs. Printing made books cheap, and the computer made copies free. Today most text is
read on a screen, and much of it is written by people who will never meet.

Cooking is a kind of chemistry. Heat changes the food: bread rises, sugar turns brown, eggs become firm. A good cook
measures carefully, tastes often and learns from mistakes. Start with a simple recipe, follow it exactly, and only
then change one thing at a time.

Learning a new skill takes practice. Set a small goal, work on it every day, and notice what gets easier. Ask for
feedback, rest when you are tired, and keep going when progress feels slow. Most experts were beginners for a long
time.

Good software is tested. Each function should do one thing, have a clear name, and handle the cases it was written
for. When a test fails, read the error message first: it usually says what went wrong and where to look.

Weather report: cloudy in the north, sunny in the south, with light winds from the west. Temperatures between 12 and
18 degrees. Rain is likely on Tuesday evening; the weekend should be warm and dry.

Dear customer, thank you for your order. Your package was shipped today and should arrive within 3 to 5 business
days. If you have any questions, please reply to this email. Best regards, the support team.
"""


def demo_model_path(name: str, cache: Path | None = None) -> Path:
    """The directory of demo model ``name`` inside ``cache`` (default: cache_dir()/demo-models), built if missing or
    made by an older recipe. Safe when several processes ask at once: each builds in a temporary directory and the
    first to finish renames it into place."""
    if name not in DEMO_MODELS:
        raise UserError(f"unknown demo model: {name}", hint=f"the demo models are {', '.join(DEMO_MODELS)}")
    root = Path(cache) if cache is not None else cache_dir() / "demo-models"
    target = root / name
    fingerprint = _fingerprint(name)
    if _read_marker(target) == fingerprint:
        return target
    root.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=root))
    try:
        _build(name, build_dir)
        (build_dir / MARKER).write_text(json.dumps(fingerprint), encoding="utf-8")
        _install(build_dir, target, fingerprint)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return target


def _fingerprint(name: str) -> dict:
    """What a built demo model depends on; a cached one whose marker differs is rebuilt."""
    spec = lookup(name)
    recipe = {
        "geometry": asdict(spec.geometry),
        "chat_template": to_chat_template(get_template(spec.template)),
        "corpus": CORPUS,
        "tokens": [SPECIAL_TOKENS, TEXT_MARKERS, TOKENIZER_VOCAB],
        "seed": SEED,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()
    return {"name": name, "recipe_version": RECIPE_VERSION, "sha256": digest}


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _install(build_dir: Path, target: Path, fingerprint: dict) -> None:
    """Rename a finished build into place; a matching build another process installed first is kept instead."""
    if target.exists():
        if _read_marker(target) == fingerprint:
            return
        stale = target.with_name(f".{target.name}-stale-{os.getpid()}")
        try:
            target.rename(stale)
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        build_dir.rename(target)
    except OSError:
        if _read_marker(target) != fingerprint:
            raise


def _build(name: str, out: Path) -> None:
    import torch

    from engine.models.loading import from_transformers

    AutoConfig, AutoModelForCausalLM = from_transformers("AutoConfig", "AutoModelForCausalLM")
    spec = lookup(name)
    geometry = spec.geometry
    tokenizer = _train_tokenizer(geometry.max_position_embeddings)
    tokenizer.chat_template = to_chat_template(get_template(spec.template))
    experts = {}
    if geometry.num_local_experts:
        experts = {"num_local_experts": geometry.num_local_experts, "num_experts_per_tok": geometry.num_experts_per_tok}
    config = AutoConfig.for_model(
        geometry.model_type,
        hidden_size=geometry.hidden_size,
        intermediate_size=geometry.intermediate_size,
        num_hidden_layers=geometry.num_hidden_layers,
        num_attention_heads=geometry.num_attention_heads,
        num_key_value_heads=geometry.num_key_value_heads,
        head_dim=geometry.head_dim,
        vocab_size=len(tokenizer),
        max_position_embeddings=geometry.max_position_embeddings,
        tie_word_embeddings=geometry.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **experts,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_tokenizer(max_length: int | None):
    """A byte-level BPE tokenizer trained on CORPUS that, like Llama's, puts <s> before every encoded text.

    It pads on the right, as training wants; generation pads on the left and sets that itself."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from engine.models.loading import from_transformers

    (PreTrainedTokenizerFast,) = from_transformers("PreTrainedTokenizerFast")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer)
    tokenizer.add_tokens([AddedToken(marker, normalized=False) for marker in TEXT_MARKERS])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=SPECIAL_TOKENS[4:],
        padding_side="right",
        model_max_length=max_length,
    )
