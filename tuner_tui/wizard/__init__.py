"""`tuner` with no arguments: a step-by-step wizard from the GPUs to a started run."""
