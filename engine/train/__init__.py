"""Training: the shared runner (runner.py) trains a stage (sft.py, dpo.py, pt.py) in a run directory (stage.py).
Beside them: the trainer arguments every stage uses, the callbacks that write the run's events, its logs, the setup
(speed plan, strategy), the strategies, the loss, plots and results files. Imports nothing of the orchestration."""
