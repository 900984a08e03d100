"""One typed configuration for every command, built from YAML files, ``key=value`` pairs and ``--flags``.

The names are the ones users know from LLaMA-Factory and Hugging Face ``TrainingArguments``; the YAML keys, the CLI
flags and the TUI's fields are the same flat names. ``parse_args`` turns a command line into a ``TunerConfig``;
``validate`` reports every problem at once, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config.library import FALSE_WORDS, TRUE_WORDS, flag_word
from engine.errors import ConfigError, UserError


def _opt(default: Any, help: str, choices: tuple | None = None, secret: bool = False) -> Any:
    """A config field: its default, one line of help, the allowed values and whether it is kept out of saved configs."""
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


ATTENTION_CHOICES = ("auto", "fa2", "fa3", "sdpa", "eager")
REFERENCE_FREE = ("orpo", "simpo")  # preference losses without a reference model (engine.train.reference_free)
ROPE_SCALING = ("linear", "dynamic", "yarn", "llama3")
FINETUNING_TYPES = ("lora", "freeze", "full")
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)
REPORTERS = ("none", "tensorboard", "wandb", "mlflow", "comet_ml", "swanlab", "trackio", "all")
STRATEGIES = ("no", "steps", "epoch")
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "fsdp_offload", "zero2", "zero2_offload", "zero3", "zero3_offload")


@dataclass
class ModelArgs:
    model_name_or_path: str | None = _opt(None, "Catalog name (see `tuner models`), hub id or local directory.")
    adapter_name_or_path: str | None = _opt(None, "A trained LoRA adapter directory to load (comma list to stack).")
    template: str | None = _opt(None, "Prompt template (see `tuner templates`); default: the model's own.")
    quantization_bit: int | None = _opt(None, "Load the base model in 4 or 8 bits (QLoRA).", (4, 8))
    quantization_type: str = _opt("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quantization: bool = _opt(True, "Quantize the 4-bit quantization constants too.")
    flash_attn: str = _opt("auto", "Attention kernel: auto picks flash-attention-2 when installed on a GPU, else SDPA.",
                           ATTENTION_CHOICES)
    trust_remote_code: bool = _opt(False, "Run Python code shipped with a hub model (off: only trusted architectures).")
    model_revision: str = _opt("main", "Hub branch, tag or commit of the model.")
    cache_dir: str | None = _opt(None, "Where hub downloads are cached (default: the Hugging Face cache).")
    hf_hub_token: str | None = _opt(None, "Hub access token for gated models (never written to saved configs).",
                                    secret=True)
    quantization_method: str = _opt("bnb", "Quantization library for quantization_bit (bitsandbytes).", ("bnb",))
    rope_scaling: str | None = _opt(None, "Stretch the model's RoPE context to cutoff_len when it is longer than the "
                                    "model's own.", ROPE_SCALING)
    infer_backend: str = _opt("huggingface", "Inference engine for chat and predict (transformers' generate).",
                              ("huggingface",))


@dataclass
class DataArgs:
    dataset: str | None = _opt(None, "Dataset name(s) from the registry, file/folder path(s) or hub id(s), comma separated.")
    dataset_dir: str = _opt("data", "Folder holding dataset_info.json and its files; the bundled demo sets are "
                            "found whatever it is.")
    eval_dataset: str | None = _opt(None, "Separate dataset(s) for evaluation, comma separated.")
    val_size: float = _opt(0.0, "Split this fraction (0-1) or number of samples off the training data for evaluation.")
    max_samples: int | None = _opt(None, "Use at most this many samples of each dataset.")
    cutoff_len: int = _opt(2048, "Maximum tokens per sample; a longer one is cut, prompt and reply in proportion, "
                           "keeping the reply's end.")
    train_on_prompt: bool = _opt(False, "Learn the prompt too, not only the assistant's replies.")
    mask_history: bool = _opt(False, "Learn only the last reply of each conversation (earlier turns are context).")
    default_system: str | None = _opt(None, "System prompt for conversations without one (default: the template's).")
    packing: bool = _opt(False, "Pack several short samples into each sequence of cutoff_len tokens.")
    padding_free: bool = _opt(True, "Join each micro-batch into one row without padding; samples never attend to "
                              "each other.")
    overwrite_cache: bool = _opt(False, "Tokenize the dataset again instead of reusing a cached copy.")
    preprocessing_num_workers: int | None = _opt(None, "Processes used to tokenize the dataset (default: up to 8, "
                                                 "one per 10,000 conversations).")
    tokenized_path: str | None = _opt(None, "Save the tokenized dataset here and stop; later runs given it load it.")


@dataclass
class FinetuneArgs:
    stage: str = _opt("sft", "Training stage: sft (supervised fine-tuning), dpo (preference tuning on ranking "
                      "pairs: a prompt, a chosen and a rejected reply), kto (preference tuning on replies marked "
                      "desirable or not), rm (a reward model that scores replies, trained on ranking pairs) or pt "
                      "(continued pre-training on raw text).", ("sft", "dpo", "kto", "rm", "pt"))
    finetuning_type: str = _opt("lora", "lora, freeze (train the last layers) or full.", FINETUNING_TYPES)
    lora_target: str = _opt("all", "Modules that get LoRA: comma list of names, or all (every linear layer but the head).")
    lora_rank: int = _opt(8, "LoRA rank r.")
    lora_alpha: int | None = _opt(None, "LoRA scale alpha (default: 2 x lora_rank).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA path.")
    use_rslora: bool = _opt(False, "Rank-stabilised LoRA scaling.")
    use_dora: bool = _opt(False, "Weight-decomposed LoRA (DoRA).")
    freeze_trainable_layers: int = _opt(2, "freeze: train the last N decoder layers (negative: the first N).")
    freeze_trainable_modules: str = _opt("all", "freeze: which modules of those layers train (comma list or all).")
    neftune_noise_alpha: float | None = _opt(None, "NEFTune: noise added to embeddings while training (e.g. 5).")
    additional_target: str | None = _opt(None, "lora: modules trained in full and saved with the adapter "
                                         "(comma list, e.g. embed_tokens,lm_head).")
    create_new_adapter: bool = _opt(False, "lora: with adapter_name_or_path, train a new adapter on top of the "
                                    "merged given one instead of training the given one further.")
    loraplus_lr_ratio: float | None = _opt(None, "LoRA+: the B matrices learn this many times faster than A "
                                           "(e.g. 16).")
    loraplus_lr_embedding: float = _opt(1e-6, "LoRA+: learning rate of LoRA on embedding layers.")
    pissa_init: bool = _opt(False, "lora: initialise the adapter from the weights' principal singular vectors "
                            "(PiSSA).")
    pissa_iter: int = _opt(16, "PiSSA: fast-SVD iterations (-1: exact SVD).")
    pissa_convert: bool = _opt(False, "PiSSA: also save the adapter converted to a plain LoRA one (pissa_converted/).")
    pref_beta: float = _opt(0.1, "dpo: beta, how far the model may move from the reference (higher: stays closer); "
                            "orpo: the weight of the odds-ratio loss; simpo: the reward scale.")
    pref_ftx: float = _opt(0.0, "dpo: weight of the supervised loss on the chosen replies, added to the preference "
                           "loss (not orpo, whose loss has it already).")
    pref_loss: str = _opt("sigmoid", "dpo: the preference loss: sigmoid (DPO), hinge (SLiC), ipo (IPO), against the "
                          "reference; orpo (ORPO), simpo (SimPO), without one.",
                          ("sigmoid", "hinge", "ipo", "orpo", "simpo"))
    pref_bco_weight: float = _opt(0.0, "dpo: weight of TRL's BCO pair loss mixed into the preference loss "
                                  "(LLaMA-Factory's (loss + w x bco) / (1 + w)).")
    dpo_label_smoothing: float = _opt(0.0, "dpo, pref_loss sigmoid: the chance that a pair's labels are flipped, "
                                      "in [0, 0.5) (conservative DPO).")
    simpo_gamma: float = _opt(0.5, "simpo: the target reward margin.")
    kto_chosen_weight: float = _opt(1.0, "kto: weight of the loss on desirable replies.")
    kto_rejected_weight: float = _opt(1.0, "kto: weight of the loss on undesirable replies.")
    ld_alpha: float | None = _opt(None, "dpo: LD-DPO's alpha, in [0, 1]: each reply's tokens past the shorter reply's "
                                  "length count this much in its log-probability (TRL's ld_alpha; 1: plain DPO).")
    ref_model: str | None = _opt(None, "dpo, kto: the reference model (catalog name, hub id in the cache, or "
                                 "directory); default: the model as it starts.")
    ref_model_adapters: str | None = _opt(None, "dpo, kto: LoRA adapters applied to ref_model (comma list: all but "
                                          "the last merged).")
    ref_model_quantization_bit: int | None = _opt(None, "dpo, kto: load ref_model in 4 or 8 bits.", (4, 8))
    precompute_ref_log_probs: bool = _opt(False, "dpo, kto: the reference's log-probabilities computed once before "
                                          "training (TRL's), so a full or freeze fine-tune holds no second model.")


@dataclass
class TrainArgs:
    output_dir: str | None = _opt(None, "The run directory: checkpoints, adapter or model, logs and events.")
    overwrite_output_dir: bool = _opt(False, "Start afresh in an output_dir that has checkpoints instead of resuming.")
    do_train: bool = _opt(False, "Train (implied by `tuner train`).")
    do_eval: bool = _opt(False, "Evaluate on the eval split once training ends (eval_results.json, perplexity).")
    do_predict: bool = _opt(False, "Predict on the dataset (classic spelling of `tuner predict`).")
    per_device_train_batch_size: int = _opt(8, "Samples per GPU per step.")
    per_device_eval_batch_size: int = _opt(8, "Samples per GPU per evaluation or prediction step.")
    gradient_accumulation_steps: int = _opt(1, "Steps whose gradients add up before each optimizer update.")
    learning_rate: float = _opt(5e-5, "Peak learning rate.")
    lr_scheduler_type: str = _opt("linear", "Learning-rate schedule.", SCHEDULERS)
    warmup_ratio: float = _opt(0.0, "Fraction of steps spent warming up.")
    warmup_steps: int = _opt(0, "Warm-up steps (overrides warmup_ratio when > 0).")
    num_train_epochs: float = _opt(3.0, "Epochs over the training data.")
    max_steps: int = _opt(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    optim: str = _opt("adamw_torch", "Optimizer name as in TrainingArguments (adamw_torch, adamw_8bit, paged_adamw_8bit, ...).")
    weight_decay: float = _opt(0.0, "Weight decay.")
    adam_beta1: float = _opt(0.9, "Adam beta1.")
    adam_beta2: float = _opt(0.999, "Adam beta2.")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    logging_steps: int = _opt(10, "Log loss, learning rate and throughput every N steps.")
    save_strategy: str = _opt("steps", "When to save checkpoints.", STRATEGIES)
    save_steps: int = _opt(500, "Save a checkpoint every N steps.")
    save_total_limit: int | None = _opt(None, "Keep at most this many checkpoints.")
    eval_strategy: str = _opt("no", "When to evaluate.", STRATEGIES)
    eval_steps: int | None = _opt(None, "Evaluate every N steps (default: logging_steps).")
    bf16: bool | None = _opt(None, "Train in bfloat16 (default: when the GPU supports it).")
    fp16: bool | None = _opt(None, "Train in float16 mixed precision.")
    gradient_checkpointing: bool | None = _opt(None, "Recompute activations in the backward pass to save memory "
                                               "(default: auto_fit decides; on without auto_fit).")
    enable_liger_kernel: bool | None = _opt(None, "Liger's fused kernels (default: on when liger-kernel is installed "
                                            "and a GPU is present).")
    pure_bf16: bool = _opt(False, "Hold the weights in bfloat16 and train without mixed precision (less memory).")
    plot_loss: bool = _opt(False, "Draw training_loss.png (and training_eval_loss.png with evaluation) in output_dir, "
                          "as LLaMA-Factory does.")
    check_fast_path: bool | None = _opt(None, "At the start, put the first micro-batch through the chosen fast path "
                                        "(padding-free rows, attention kernel, fused loss) and the classic one, and "
                                        "fall back to the classic path if they disagree (default: on a GPU).")
    auto_fit: bool = _opt(True, "Choose tokens per micro-batch, accumulation and checkpointing for the GPU's free "
                          "memory, keeping the samples per optimizer step; false keeps the batch settings as given.")
    seed: int = _opt(42, "Random seed.")
    resume_from_checkpoint: str | None = _opt(None, "A checkpoint directory, or true for the last one in output_dir.")
    report_to: str = _opt("none", "Experiment trackers to report to (comma list).")
    run_name: str | None = _opt(None, "A name for the run (shown in `tuner runs` and trackers).")
    dataloader_num_workers: int = _opt(0, "Processes that load batches.")
    deepspeed: str | None = _opt(None, "A DeepSpeed config file.")
    fsdp: str | None = _opt(None, "FSDP options as in TrainingArguments (e.g. 'full_shard auto_wrap').")
    ddp_timeout: int = _opt(1800, "Seconds before a multi-GPU collective times out.")
    nproc_per_node: int | None = _opt(None, "Training processes on this machine, one per GPU (default: every GPU "
                                      "CUDA_VISIBLE_DEVICES shows, 1 without a GPU); more than 1 across the run and "
                                      "tuner launches torchrun itself.")
    nnodes: int | None = _opt(None, "Machines the run spans (default 1, or Slurm's SLURM_NNODES under srun).")
    node_rank: int | None = _opt(None, "This machine's number, 0 to nnodes-1 (default 0, or Slurm's SLURM_NODEID).")
    master_addr: str | None = _opt(None, "Address of node 0, which every machine reaches (default 127.0.0.1, or the "
                                   "first host of the Slurm job).")
    master_port: int | None = _opt(None, "Port node 0 listens on for the other processes (default: a free port on "
                                   "one machine, 29500 across several).")
    strategy: str = _opt("ddp", "How the processes share the model: ddp (a whole copy on each GPU), fsdp (PyTorch FSDP "
                         "full shard, one decoder layer per unit), zero2 / zero3 (DeepSpeed ZeRO stage 2 / 3); "
                         "_offload also keeps optimizer states (and zero3's, fsdp's weights) in CPU memory.",
                         DISTRIBUTED_STRATEGIES)


@dataclass
class GenerateArgs:
    predict_with_generate: bool = _opt(False, "Generate text when predicting (and score it).")
    max_new_tokens: int = _opt(512, "Most tokens generated per answer.")
    do_sample: bool = _opt(False, "Sample instead of greedy decoding.")
    temperature: float = _opt(0.7, "Sampling temperature (with do_sample).")
    top_p: float = _opt(0.9, "Nucleus sampling threshold (with do_sample).")
    top_k: int = _opt(50, "Top-k sampling (with do_sample).")
    repetition_penalty: float = _opt(1.0, "Penalty for repeated tokens (1.0: none).")
    num_beams: int = _opt(1, "Beam search width (1: none).")


@dataclass
class ExportArgs:
    export_dir: str | None = _opt(None, "Write the merged model here (safetensors).")
    export_size: int = _opt(5, "Largest safetensors shard, in GB.")
    export_device: str = _opt("cpu", "Where the weights are merged: cpu, or auto (the GPUs when there are).",
                              ("cpu", "auto"))
    export_legacy_format: bool = _opt(False, "Write .bin pickles instead of safetensors (refused: tuner writes "
                                      "safetensors only).")


SECTIONS: dict[str, type] = {
    "model": ModelArgs,
    "data": DataArgs,
    "finetune": FinetuneArgs,
    "train": TrainArgs,
    "generate": GenerateArgs,
    "export": ExportArgs,
}

# Old spellings that tutorials still use, with the name they mean today.
ALIASES = {
    "checkpoint_dir": "adapter_name_or_path",
    "num_layer_trainable": "freeze_trainable_layers",
    "name_module_trainable": "freeze_trainable_modules",
    "evaluation_strategy": "eval_strategy",
    "use_liger_kernel": "enable_liger_kernel",
    "lora_r": "lora_rank",
}

# Values of bare or boolean flags that mean something else for a field: a bare `--flash_attn` asked for flash attention 2.
FLAG_VALUES = {"flash_attn": {True: "fa2", False: "sdpa", "disabled": "eager"}}

# Stages of LLaMA-Factory that this tool does not run, so the message can say so rather than "unknown value".
UNSUPPORTED_STAGES = ("ppo",)


def has_reference(f: FinetuneArgs) -> bool:
    """Whether the stage trains against a frozen reference: kto, and dpo but with ORPO or SimPO."""
    return f.stage == "kto" or (f.stage == "dpo" and f.pref_loss not in REFERENCE_FREE)


@dataclass
class TunerConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    generate: GenerateArgs = field(default_factory=GenerateArgs)
    export: ExportArgs = field(default_factory=ExportArgs)
    # TrainingArguments / SFTConfig fields that are not tuner's own, given by the user: passed to SFTConfig as they are
    passthrough: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, include_secrets: bool = False) -> dict[str, Any]:
        """The flat ``{key: value}`` form used by YAML files and flags."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                if f.metadata.get("secret") and not include_secrets:
                    continue
                flat[f.name] = getattr(obj, f.name)
        flat.update(self.passthrough)
        return flat

    def to_yaml(self) -> str:
        """The resolved config as YAML, grouped by section with a comment heading each, secrets left out."""
        flat = self.to_dict()
        chunks = []
        for section, cls in SECTIONS.items():
            keys = {f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat}
            chunks.append(f"### {section}\n" + yaml.safe_dump(keys, sort_keys=False, default_flow_style=False))
        if self.passthrough:
            chunks.append(f"### {PASSTHROUGH_SECTION}\n" + yaml.safe_dump(self.passthrough, sort_keys=False,
                                                                         default_flow_style=False))
        return "\n".join(chunks)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


PASSTHROUGH_SECTION = "transformers (TrainingArguments / SFTConfig fields, passed through)"


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


FIELDS = _field_index()
# Each key's type, from the sections' own annotations (typing resolves them: they are text under __future__)
TYPES = {name: hint for cls in SECTIONS.values() for name, hint in typing.get_type_hints(cls).items()}


def known_keys() -> list[str]:
    return list(FIELDS)


def passthrough_fields() -> dict:
    """The installed transformers' and TRL's training fields that are not tuner's own (engine.config.library)."""
    from engine.config.library import passthrough_fields as fields

    return fields(set(FIELDS) | set(ALIASES))


def closest_key(key: str) -> str | None:
    from engine.config.llamafactory import TRANSLATED, UNSUPPORTED

    # LLaMA-Factory's own names are candidates too, so a near miss of one is never pointed at a key of another meaning
    known = list(FIELDS) + list(ALIASES) + list(passthrough_fields()) + list(TRANSLATED) + list(UNSUPPORTED)
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return ALIASES.get(matches[0], matches[0]) if matches else None


def base_type(key: str) -> Any:
    """The type a key's value takes: ``int | None`` -> int."""
    hint = TYPES[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) and args:
        return args[0]
    return hint


def _is_optional(key: str) -> bool:
    return type(None) in typing.get_args(TYPES[key])


_TRUE, _FALSE = TRUE_WORDS, FALSE_WORDS


def coerce(key: str, value: Any) -> Any:
    """Turn a value from YAML or the command line into the field's type; raises ValueError with the reason."""
    _, f = FIELDS[key]
    if key in FLAG_VALUES and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        value = value.lower() in _TRUE  # `--flash_attn true` as a bare `--flash_attn`
    if key in FLAG_VALUES and value in FLAG_VALUES[key]:
        value = FLAG_VALUES[key][value]
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and _is_optional(key)):
        if _is_optional(key):
            return None
        raise ValueError("needs a value")
    kind = base_type(key)
    if kind is bool:
        flag = flag_word(value)
        if flag is None:
            raise ValueError(f"expected true or false, got {value!r}")
        return flag
    if kind in (int, float):
        whole = kind is int
        expected = "a whole number" if whole else "a number"
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (whole and not number.is_integer()):
            raise ValueError(f"expected {expected}, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return int(number) if whole else number
    if isinstance(value, bool):  # YAML reads a bare `no` as false: `save_strategy: no` means the choice "no"
        if not value and "no" in (f.metadata.get("choices") or ()):
            return "no"
        raise ValueError(f"expected text, got {value!r}")
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def build_config(values: dict[str, Any], problems: list[str] | None = None, command: str = "train") -> TunerConfig:
    """A config from flat ``{key: value}`` pairs (old spellings and LLaMA-Factory's keys accepted).

    Every bad key and value is reported at once: raised as one ``ConfigError``, or, when a ``problems`` list is given,
    appended to it and the config built from the rest (so validation can add its findings to the same round).
    """
    from engine.config.llamafactory import translate

    collect = problems is not None
    problems = problems if collect else []
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    passthrough: dict[str, Any] = {}
    for raw_key, raw_value in translate(values, problems).items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in FIELDS:
            problem = _library_key(key, raw_value, passthrough, command)
            if problem:
                problems.append(problem)
            continue
        try:
            value = coerce(key, raw_value)
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
            continue
        choices = FIELDS[key][1].metadata.get("choices")
        if key == "stage" and value in UNSUPPORTED_STAGES:
            problems.append(f"LLaMA-Factory's stage {value} is not supported by tuner: tuner runs supervised "
                            "fine-tuning (stage sft), preference tuning (stages dpo and kto), reward models (stage "
                            "rm) and pre-training (stage pt)")
        elif key == "pref_loss" and value == "kto_pair":
            problems.append("LLaMA-Factory's pref_loss kto_pair is not supported by tuner: TRL 1.16 no longer has "
                            "it; use pref_loss sigmoid (DPO) on the same pairs")
        elif choices and value is not None and value not in choices:
            problems.append(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}")
        else:
            sections[FIELDS[key][0]][key] = value
    if problems and not collect:
        raise ConfigError(problems)
    return TunerConfig(**{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()},
                       passthrough=passthrough)


def _library_key(key: str, value: Any, passthrough: dict[str, Any], command: str) -> str | None:
    """A TrainingArguments / SFTConfig field kept in ``passthrough``; else the problem with the key, in one line."""
    from engine.config.library import ENGINE_SET, coerce_library

    library = passthrough_fields()
    if key in library:
        try:
            passthrough[key] = coerce_library(library[key], value)
        except ValueError as exc:
            return f"{key}: {exc}"
        return None
    if key in ENGINE_SET:
        return f"{key} is set by tuner: {ENGINE_SET[key]}"
    suggestion = closest_key(key)
    hint = f"did you mean {suggestion}?" if suggestion else f"see `tuner {command} --help` for the known keys"
    return f"unknown key '{key}': {hint}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flat keys from a YAML (or JSON) file; one clear line when it is missing or not a mapping."""
    from engine.rundir.files import read_user_text

    p = Path(path)
    text = read_user_text(p, "config file", max_bytes=16 << 20)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {p}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except RecursionError:
        raise UserError(f"config file {p} nests too deeply to be a config of key: value") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a mapping of key: value, not a {type(data).__name__}")
    return data


def _looks_like_config_file(token: str) -> bool:
    return token.endswith((".yaml", ".yml", ".json")) and "=" not in token


def _takes_value(name: str, token: str) -> bool:
    """Whether the token after ``--name`` is its value: not another flag, and for on/off flags only a boolean word."""
    if token.startswith("--") and not (token[2:3].isdigit() or token[2:3] == "."):
        return False
    key = ALIASES.get(name, name)
    if key in FIELDS and base_type(key) is bool:
        return token.lower() in _TRUE | _FALSE
    if key in FLAG_VALUES:
        return token.lower() in _TRUE | _FALSE | set(FLAG_VALUES[key]) - {True, False} | set(
            FIELDS[key][1].metadata["choices"])
    return True


def parse_overrides(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split a command line into config files and ``{key: value}`` overrides, in the order given.

    Accepts ``file.yaml``, ``key=value``, ``--key value``, ``--key=value`` and bare ``--flag`` (true).
    """
    files: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            name = name.replace("-", "_")
            if not eq:
                if i + 1 < len(argv) and _takes_value(name, argv[i + 1]):
                    value = argv[i + 1]
                    i += 1
                else:
                    value = True
            overrides[name] = value
        elif "=" in token and not token.startswith("="):
            name, _, value = token.partition("=")
            overrides[name.strip()] = value
        elif _looks_like_config_file(token):
            files.append(token)
        else:
            raise UserError(f"unexpected argument '{token}'",
                            "give config files (.yaml), key=value pairs or --key value flags")
        i += 1
    return files, overrides


def parse_args(argv: list[str], base: dict[str, Any] | None = None, problems: list[str] | None = None,
               command: str = "train") -> TunerConfig:
    """Files first (later files win), then overrides; unknown keys and bad values raise one ``ConfigError``, or go
    into ``problems`` when it is given (see ``build_config``)."""
    return build_config(given_values(argv, base), problems, command)


def given_values(argv: list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat keys the user gave, not yet checked: ``base``, then each file (later files win), then overrides."""
    files, overrides = parse_overrides(argv)
    values: dict[str, Any] = dict(base or {})
    for path in files:
        values.update(read_config_file(path))
    values.update(overrides)
    return values
