"""tuner-tui's engine: everything that does work, usable without the TUI. One package per part:

config (the typed config and its validation), data (datasets, templates applied, preview), models (catalog, demo
models, resolving a name, loading), memory (the VRAM estimate and the recommendation), train (SFT in a run
directory), infer (predict, chat, export, follow-ups of a run), runs (the run directory and its processes), and cli
(the `tuner` front end: arguments and terminal output). hardware (the GPU probe) and templates stand alone.

Nothing here imports torch, transformers, peft, trl, datasets or bitsandbytes at module level.
"""
