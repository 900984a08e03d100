"""GPU memory: the estimate per component and the method recommended for the GPUs found."""
