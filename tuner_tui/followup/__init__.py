"""Using a finished run from the dashboard: chat with it, predict on a dataset, export it merged."""
