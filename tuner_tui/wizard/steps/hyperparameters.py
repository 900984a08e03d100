"""Step 5, Hyperparameters: the usual few, and the rest of an SFT recipe in an Advanced section, checked as typed."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.widgets import Collapsible, Static

from engine.errors import ConfigError
from tuner_tui.wizard.state import method_keys
from tuner_tui.wizard.steps.base import WizardStep, setting_row

HYPERPARAMETERS = (("learning_rate", "Learning rate"), ("num_train_epochs", "Epochs"), ("max_steps", "Max steps"),
                   ("per_device_train_batch_size", "Batch per GPU"),
                   ("gradient_accumulation_steps", "Grad accumulation"), ("cutoff_len", "Cutoff len"),
                   ("output_dir", "Output dir"))
# Behind "Advanced": the rest of what a LLaMA-Factory SFT recipe sets.
ADVANCED = (("optim", "Optimizer"), ("lr_scheduler_type", "LR schedule"), ("warmup_ratio", "Warmup ratio"),
            ("warmup_steps", "Warmup steps"), ("weight_decay", "Weight decay"), ("max_grad_norm", "Max grad norm"),
            ("lora_dropout", "LoRA dropout"), ("use_rslora", "rsLoRA scaling"), ("use_dora", "DoRA"),
            ("neftune_noise_alpha", "NEFTune alpha"), ("packing", "Packing"), ("train_on_prompt", "Train on prompt"),
            ("max_samples", "Max samples"), ("val_size", "Validation size"), ("eval_strategy", "Evaluate"),
            ("eval_steps", "Eval steps"), ("per_device_eval_batch_size", "Eval batch per GPU"),
            ("logging_steps", "Logging steps"), ("save_strategy", "Save checkpoints"), ("save_steps", "Save steps"),
            ("save_total_limit", "Keep checkpoints"), ("seed", "Seed"),
            ("auto_fit", "Auto-fit batch"), ("padding_free", "Padding-free"),
            ("gradient_checkpointing", "Grad checkpointing"), ("enable_liger_kernel", "Liger kernels"),
            ("bf16", "bf16"), ("fp16", "fp16"),
            ("flash_attn", "Attention"), ("report_to", "Report to"), ("run_name", "Run name"),
            ("nnodes", "Machines"), ("master_addr", "Node 0 address"))
LORA_ONLY = ("lora_dropout", "use_rslora", "use_dora")


class HyperparametersStep(WizardStep):
    TITLE = "Hyperparameters"
    STEP = 5
    CHECKED = tuple(key for key, _ in HYPERPARAMETERS + ADVANCED)

    def body(self) -> ComposeResult:
        for key, label in HYPERPARAMETERS:
            yield from setting_row(key, label, self.choices)
            if key == "max_steps":
                yield Static("", id="length-note", classes="hint")
        with Collapsible(title="Advanced", id="advanced"):
            for key, label in ADVANCED:
                yield from setting_row(key, label, self.choices)

    def on_mount(self) -> None:
        """LoRA-only settings show for LoRA (and wherever a value was typed, so it can be seen and fixed)."""
        lora = method_keys(self.choices.method or "lora")["finetuning_type"] == "lora"
        for key in LORA_ONLY:
            if not lora and not self.choices.values.get(key):
                for widget in self.query(f"#row-{key}, #err-{key}"):
                    widget.display = False
        self._show_length()

    def _show_length(self) -> None:
        """Which of Epochs and Max steps sets the run's length (the recipe's max_steps included): max_steps above 0
        overrides num_train_epochs, as in HF Trainer."""
        try:
            train = self.choices.config().train
        except ConfigError:
            return  # a value half typed: the note stays as it was until the values build again
        if train.max_steps > 0:
            text = (f"Max steps {train.max_steps} is above 0, so it sets the run's length and Epochs is unused (as in "
                    "HF Trainer)")
        else:
            text = f"Epochs {train.num_train_epochs:g} sets the run's length (Max steps above 0 would override it)"
        self.query_one("#length-note", Static).update(text)

    def changed(self, key: str) -> None:
        self._show_length()
        self.later("validate", lambda: self.work("validate", self.check, "checking the values"))

    def done(self, group: str, result: Any) -> None:
        self.show_problems(result)

    def show_problems(self, problems: dict[str, str]) -> None:
        """Messages beside the fields; the advanced ones open their section so they are seen."""
        super().show_problems(problems)
        if any(key in problems for key, _ in ADVANCED):
            self.query_one("#advanced", Collapsible).collapsed = False
