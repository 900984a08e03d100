"""Keep the libraries' own chatter (progress bars, notices they raise at each other) out of the user's terminal."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's bars (its reference log-probabilities computed beforehand)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernel notices, not about the user's run
    # the kernels hub bitsandbytes asks for its CPU kernel: "Skipping publisher trust check" in offline mode
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*checkpointing.*deprecated", category=FutureWarning)
    # torch telling DeepSpeed of its renamed collectives, at every step: not about the user's run
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
