"""Our templates against LLaMA-Factory's: its register_template definitions rendered by its own rules (the published
chat templates of the families LLaMA-Factory has no definition of ours to follow for: tests/shared)."""

from __future__ import annotations

import pytest

from engine.templates import IGNORE_INDEX, encode, get_template, render_segments, render_text

BOS, EOS = {"bos_token"}, {"eos_token"}
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>"]

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]
PADDED = [{"role": "user", "content": "  Hi\n"}, {"role": "assistant", "content": " Hello! "}]
THOUGHT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!"}]

CHATML_USER = ["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]
CHATML_SYSTEM = ["<|im_start|>system\n{{content}}<|im_end|>\n"]
CHATML_ASSISTANT = ["{{content}}<|im_end|>\n"]
LLAMA3 = dict(
    user=["<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"],
    assistant=["{{content}}<|eot_id|>"], system=["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
    prefix=[BOS],
)  # fmt: skip
GEMMA = dict(
    user=["<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"],
    assistant=["{{content}}<end_of_turn>\n"], system=["{{content}}\n\n"], prefix=[BOS], llama2=True,
)
INTERN = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language "
    "chosen by the user such as English and 中文."
)
SKYWORK = (
    "You are Skywork-o1, a thinking model developed by Skywork AI, specializing in solving complex problems "
    "involving mathematics, coding, and logical reasoning through deep thought. When faced with a user's request, "
    "you first engage in a lengthy and in-depth thinking process to explore possible solutions to the problem. "
    "After completing your thoughts, you then provide a detailed explanation of the solution process "
    "in your response."
)

# LLaMA-Factory's register_template calls (src/llamafactory/data/template.py), transcribed slot for slot.
LLAMA_FACTORY = {
    "alpaca": dict(
        user=["### Instruction:\n{{content}}\n\n### Response:\n"], assistant=["{{content}}", EOS, "\n\n"],
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        ),
    ),  # fmt: skip
    "llama2": dict(user=[BOS, "[INST] {{content}} [/INST]"], system=["<<SYS>>\n{{content}}\n<</SYS>>\n\n"], llama2=True),
    "mistral": dict(
        user=["[INST] {{content}}[/INST]"], assistant=[" {{content}}", EOS], system=["{{content}}\n\n"], prefix=[BOS],
        llama2=True,
    ),
    "ministral": dict(user=["[INST]{{content}}[/INST]"], system=["{{content}}\n\n"], prefix=[BOS], llama2=True),
    "ministral3": dict(user=["[INST]{{content}}[/INST]"], system=["{{content}}\n\n"], prefix=[BOS], llama2=True),
    "mistral_small": dict(
        user=["[INST]{{content}}[/INST]"], system=["[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]"], prefix=[BOS]
    ),
    "llama3": LLAMA3,
    "skywork_o1": dict(LLAMA3, default_system=SKYWORK),
    "openchat-3.6": dict(
        user=[
            "<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n"
        ],
        prefix=[BOS],
    ),
    "llama4": dict(
        user=["<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n"],
        assistant=["{{content}}<|eot|>"], system=["<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>"],
        prefix=[BOS],
    ),
    "chatml": dict(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM),
    "qwen": dict(
        user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM,
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    "qwen3": dict(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM, reasoning=True),
    "qwen3_nothink": dict(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM),
    "yi": dict(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM),
    "intern2": dict(user=CHATML_USER, assistant=CHATML_ASSISTANT, system=CHATML_SYSTEM, prefix=[BOS],
                    default_system=INTERN),
    "phi": dict(
        user=["<|user|>\n{{content}}<|end|>\n<|assistant|>\n"], assistant=["{{content}}<|end|>\n"],
        system=["<|system|>\n{{content}}<|end|>\n"],
    ),
    "phi_small": dict(
        user=["<|user|>\n{{content}}<|end|>\n<|assistant|>\n"], assistant=["{{content}}<|end|>\n"],
        system=["<|system|>\n{{content}}<|end|>\n"], prefix=[{"<|endoftext|>"}],
    ),
    "phi4": dict(
        user=["<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>"],
        assistant=["{{content}}<|im_end|>"], system=["<|im_start|>system<|im_sep|>{{content}}<|im_end|>"],
    ),
    "gemma": GEMMA,
    "gemma2": dict(GEMMA, efficient_eos=True),
    "gemma3": GEMMA,
    "deepseek": dict(user=["User: {{content}}\n\nAssistant:"], system=["{{content}}\n\n"], prefix=[BOS]),
    "deepseek3": dict(user=["<｜User｜>{{content}}<｜Assistant｜>"], prefix=[BOS]),
    "glm4": dict(
        user=["<|user|>\n{{content}}<|assistant|>"], assistant=["\n{{content}}"], system=["<|system|>\n{{content}}"],
        prefix=["[gMASK]<sop>"], efficient_eos=True,
    ),
    "chatglm3": dict(
        user=["<|user|>", "\n", "{{content}}", "<|assistant|>"], assistant=["\n", "{{content}}"],
        system=["<|system|>", "\n", "{{content}}"], prefix=["[gMASK]", "sop"], efficient_eos=True,
    ),
    "baichuan2": dict(user=["<reserved_106>{{content}}<reserved_107>"], efficient_eos=True),
    "cohere": dict(
        user=["<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"],
        system=["<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"], prefix=[BOS],
    ),  # fmt: skip
    "falcon": dict(user=["User: {{content}}\nFalcon:"], assistant=["{{content}}\n"], efficient_eos=True),
    "olmo": dict(user=["<|user|>\n{{content}}<|assistant|>\n"], prefix=[EOS]),
    "solar": dict(
        user=["### User:\n{{content}}\n\n### Assistant:\n"], system=["### System:\n{{content}}\n\n"], efficient_eos=True
    ),
    "openchat": dict(user=["GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"], prefix=[BOS]),
    "vicuna": dict(
        user=["USER: {{content}} ASSISTANT:"],
        default_system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
    ),
    "zephyr": dict(
        user=["<|user|>\n{{content}}", EOS, "<|assistant|>\n"], system=["<|system|>\n{{content}}", EOS],
        default_system="You are Zephyr, a helpful assistant.",
    ),
    "default": dict(
        user=["Human: {{content}}", EOS, "\nAssistant:"], assistant=["{{content}}", EOS, "\n"],
        system=["System: {{content}}", EOS, "\n"],
    ),
    "empty": dict(assistant=["{{content}}"]),
}

# Where ours follows the family's own published template instead (README.md, templates section).
FOLLOWS_THE_PUBLISHED = {"alpaca", "llama2", "mistral", "chatml", "phi_small", "vicuna", "zephyr"}


def lf_pairs(definition: dict, messages: list[dict], bos: str, eos: str) -> list[tuple[str, str]]:
    """(prompt, reply) texts as LLaMA-Factory's Template._encode / Llama2Template._encode / ReasoningTemplate lay
    them out, and its supervised processor's closing eos for efficient_eos."""
    efficient = definition.get("efficient_eos", False)
    formats = {
        "prefix": definition.get("prefix", []),
        "system": definition.get("system", ["{{content}}"]),
        "user": definition.get("user", ["{{content}}"]),
        "assistant": definition.get("assistant", ["{{content}}"] if efficient else ["{{content}}", EOS]),
    }

    def apply(slots, content=""):
        text = ""
        for slot in slots:
            if isinstance(slot, str):
                text += slot.replace("{{content}}", content, 1)
            elif "bos_token" in slot:
                text += bos
            elif "eos_token" in slot:
                text += eos
        return text

    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    messages = messages[1:] if system is not None else messages
    system = system or definition.get("default_system", "")
    encoded = []
    for i, message in enumerate(messages):
        text, content = "", message["content"]
        if i == 0:
            text += apply(formats["prefix"])
            if system and definition.get("llama2"):
                content = apply(formats["system"], system) + content
            elif system:
                text += apply(formats["system"], system)
        text += apply(formats["user" if message["role"] == "user" else "assistant"], content)
        encoded.append(text)
    pairs = [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]
    if definition.get("reasoning"):
        replies = messages[1::2]
        pairs = [(s, t if "<think>" in r["content"] else "<think>\n\n</think>\n\n" + t) for (s, t), r in zip(pairs, replies)]
    if efficient:
        pairs[-1] = (pairs[-1][0], pairs[-1][1] + eos)
    return pairs


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Hello! Hi, be brief. What is 2+2? It is 4."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def learned(segments) -> list[str]:
    return [segment.text for segment in segments if segment.learned]


CASES = {"one turn": TWO_TURNS[:2], "two turns": TWO_TURNS, "system": [SYSTEM, *TWO_TURNS], "padded": PADDED,
         "thought": THOUGHT}


def test_every_llama_factory_text_template_transcribed_here_is_shipped():
    assert all(get_template(name).name == name for name in LLAMA_FACTORY)


# A trimming template (one that follows a published format) differs from LLaMA-Factory on padded text by design.
COMPARED = [
    (name, case)
    for name in sorted(set(LLAMA_FACTORY) - FOLLOWS_THE_PUBLISHED)
    for case in CASES
    if not (case == "padded" and get_template(name).trim)
]


@pytest.mark.parametrize(("name", "case"), COMPARED, ids=[f"{name}-{case}" for name, case in COMPARED])
def test_render_and_learned_parts_equal_llama_factorys(tok, name, case):
    template, conversation = get_template(name), CASES[case]
    pairs = lf_pairs(LLAMA_FACTORY[name], conversation, tok.bos_token, tok.eos_token)
    segments = render_segments(template, conversation, tok)
    assert render_text(template, conversation, tok) == "".join(s + t for s, t in pairs)
    assert learned(segments) == [target for _, target in pairs]


@pytest.mark.parametrize("case", ["one turn", "two turns", "system"])
def test_where_ours_follows_the_published_file_the_difference_is_the_documented_one(tok, case):
    conversation = CASES[case]

    def lf(name):
        return "".join(s + t for s, t in lf_pairs(LLAMA_FACTORY[name], conversation, tok.bos_token, tok.eos_token))

    def ours(name):
        return render_text(get_template(name), conversation, tok)

    # bos first, and "\n\n" after a system prompt of the data's own (LLaMA-Factory's default one carries it)
    assert ours("alpaca").replace("Be brief.\n\n", "Be brief.") == "<s>" + lf("alpaca")
    assert ours("chatml") == "<s>" + lf("chatml")  # bos first, as the published chatml file
    assert ours("phi_small") == "<s>" + lf("phi_small")  # LLaMA-Factory's {"<|endoftext|>"} slot renders nothing
    assert ours("mistral").replace(" [/INST]", "[/INST]") == lf("mistral")  # Mistral's ' [/INST]'
    assert ours("llama2").replace("[/INST] ", "[/INST]").replace(" </s>", "</s>") == lf("llama2")  # Meta's spaces


def test_default_system_prompts_are_llama_factorys():
    assert render_text(get_template("alpaca"), TWO_TURNS[:2]).startswith(
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\n"
    )
    assert get_template("vicuna").default_system == LLAMA_FACTORY["vicuna"]["default_system"]
    assert get_template("zephyr").default_system == "You are Zephyr, a helpful assistant."
    for name, definition in LLAMA_FACTORY.items():
        if definition.get("default_system"):
            assert get_template(name).default_system == definition["default_system"].strip(), name


def test_qwen3_learns_an_empty_thought_and_keeps_a_given_one(tok):
    sample = encode(tok, get_template("qwen3"), THOUGHT)
    reply = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert tok.decode(reply) == "<think>\nhm\n</think>\n\nHello!<|im_end|>\n"
    assert learned(render_segments(get_template("qwen3"), TWO_TURNS[:2], tok)) == [
        "<think>\n\n</think>\n\nHello!<|im_end|>\n"
    ]
    assert learned(render_segments(get_template("qwen3_nothink"), TWO_TURNS[:2], tok)) == ["Hello!<|im_end|>\n"]
