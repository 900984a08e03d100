"""Supervised fine-tuning in a prepared run directory, and the callbacks that write its events."""
