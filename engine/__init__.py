"""tuner-tui's engine: everything that does work, usable without the TUI.

Nothing here imports torch, transformers, peft, trl, datasets or bitsandbytes at module level.
"""
