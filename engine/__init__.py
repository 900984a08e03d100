"""tuner-tui's engine: everything that does work, usable without the TUI. One package per part (docs/design.md
draws them and the arrows between them):

cli (the `tuner` front end: arguments and terminal output); runs (orchestration: starting, supervising and stopping
runs, the GPU queue, follow-up tasks); train (a shared runner and its stages, in a run directory) and infer
(predict, chat, export); models (catalog, demo models, resolving a name, loading), data (datasets, templates
applied, preview) and memory (the VRAM estimate, the recommendation); rundir (the run directory's format and its
readers) and config (the typed config and its validation); world (which processes a run has), hardware (the GPU
probe), paths and errors stand alone.

Nothing here imports torch, transformers, peft, trl, datasets or bitsandbytes at module level.
"""
