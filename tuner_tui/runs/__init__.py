"""The runs on this host as a list, and how an app moves between it and a run's dashboard."""
