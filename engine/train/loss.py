"""The trainer class for each way of computing the loss that engine.train.speed chooses.

- "trl": TRL's SFTTrainer as it is: a tiled LM head that never holds the full logits and also computes entropy and
  top-1 accuracy at every step (with a host sync).
- "liger": the model's own forward, which Liger's fused linear cross-entropy has replaced.
- "model": the LM head projects only the positions whose next token is learned (``logits_to_keep``), and the loss is
  plain cross-entropy over them: the same number as the model's own loss without the prompt's logits.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def learned_token_loss(model, inputs: dict, num_items_in_batch=None):
    """Cross-entropy over the learned tokens, summed and divided by ``num_items_in_batch`` (the Trainer's count of
    learned tokens over the accumulated micro-batches) or by this batch's own count; returns (loss, outputs)."""
    import torch
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    positions = learned.any(dim=0).nonzero().flatten()  # the union over the batch's rows
    outputs = model(**inputs, logits_to_keep=positions)
    logits = outputs.logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets[:, positions].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else learned.sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


def trainer_class(loss: str):
    """SFTTrainer, or SFTTrainer with the loss above / the model's own (see the module's docstring)."""
    from trl import SFTTrainer

    if loss == "trl":
        return SFTTrainer
    from transformers import Trainer

    class LeanSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False  # with a KV cache transformers builds no packed mask: samples would mix
            if loss == "liger" or getattr(self.model.config, "output_router_logits", False):
                # Liger's forward computes its fused loss from the labels; a router's auxiliary loss comes with the
                # model's own
                return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            value, outputs = learned_token_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs \
                    and num_items_in_batch is not None:  # as Trainer.compute_loss: DDP averages the gradients
                value = value * self.accelerator.num_processes
            return (value, outputs) if return_outputs else value

    return LeanSFTTrainer
