"""Using what was trained: predict with metrics, chat, export merged, and the config that points them at a run."""
