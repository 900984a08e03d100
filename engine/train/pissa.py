"""PiSSA's adapter files in LLaMA-Factory's layout: the adapter before training (pissa_init) and, with
pissa_convert, the trained one as a plain LoRA adapter for the original base (pissa_converted)."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.rundir.run import RunDir

log = logging.getLogger("tuner")

PISSA_INIT, PISSA_CONVERTED = "pissa_init", "pissa_converted"


def save_init(model, run: RunDir) -> None:
    """The PiSSA adapter before training, which pissa_convert subtracts at the end (LLaMA-Factory's layout). A resumed
    run keeps the one its first start wrote."""
    target = run.path / PISSA_INIT
    if (target / "adapter_config.json").is_file():
        return
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # reloads as a plain adapter, no second SVD
    try:
        model.save_pretrained(str(target))
    finally:
        config.init_lora_weights = init


def save_converted(model, run: RunDir) -> None:
    """The trained PiSSA adapter as a plain LoRA one (rank doubled) that applies to the original base model, with
    the modules it trains whole (additional_target, a reward model's score head)."""
    target = run.path / PISSA_CONVERTED
    model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(run.path / PISSA_INIT))
    _keep_whole_modules(run.path / ADAPTER_FILE, target / ADAPTER_FILE)
    log.info("PiSSA adapter converted to a plain LoRA adapter for the original base: %s", target)


ADAPTER_FILE = "adapter_model.safetensors"


def _keep_whole_modules(trained: Path, converted: Path) -> None:
    """PEFT's conversion writes the LoRA matrices only: the weights of modules trained whole, which do not depend on
    the base, are copied from the trained adapter as they are."""
    from safetensors.torch import load_file, save_file

    whole = {key: value for key, value in load_file(trained).items() if "lora_" not in key}
    if not whole:
        return
    tensors = load_file(converted)
    save_file({**whole, **tensors}, converted, metadata={"format": "pt"})
