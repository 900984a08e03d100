"""The run dashboard (`tuner monitor`): samplers that read a run directory and the GPUs, the screen and its widgets."""
