"""PiSSA's adapter files in LLaMA-Factory's layout: the adapter before training (pissa_init) and, with
pissa_convert, the trained one as a plain LoRA adapter for the original base (pissa_converted)."""

from __future__ import annotations

import logging

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
    """The trained PiSSA adapter as a plain LoRA one (rank doubled) that applies to the original base model."""
    target = run.path / PISSA_CONVERTED
    model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(run.path / PISSA_INIT))
    log.info("PiSSA adapter converted to a plain LoRA adapter for the original base: %s", target)
