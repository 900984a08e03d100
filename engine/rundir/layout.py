"""The names of a run directory's files, in one place; docs/design.md says what each holds and who writes it."""

CONFIG = "config.yaml"  # the resolved config a run (and its resume) reads back
STATUS = "status.json"
EVENTS = "events.jsonl"
TRAIN_LOG = "train.log"
TRAINER_LOG = "trainer_log.jsonl"  # LLaMA-Factory's line format (a predict directory has one too)
LOCK = ".tuner.lock"
RUN_FILES = (STATUS, EVENTS, TRAINER_LOG, TRAIN_LOG, CONFIG)  # what a fresh start over the directory removes
