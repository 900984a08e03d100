"""Models: the catalog, the demo models built here, and loading (precision, attention, quantization, method)."""
