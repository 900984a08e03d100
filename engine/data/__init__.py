"""Datasets: the registry (LLaMA-Factory's dataset_info.json), readers, converters to ``{"messages": [...]}``, stats.

Importing this package is cheap; `datasets` and `pyarrow` load only when a hub or Parquet dataset is read.
"""

from engine.data.converters import Converted, convert, detect_format
from engine.data.loaders import (
    DatasetReport,
    LoadedData,
    LoadReport,
    load_conversations,
    load_dataset_conversations,
    split_eval,
)
from engine.data.readers import read_file, read_records
from engine.data.registry import DatasetAttr, dataset_names, load_registry, resolve_dataset
from engine.data.stats import length_stats

__all__ = [
    "Converted",
    "DatasetAttr",
    "DatasetReport",
    "LoadReport",
    "LoadedData",
    "convert",
    "dataset_names",
    "detect_format",
    "length_stats",
    "load_conversations",
    "load_dataset_conversations",
    "load_registry",
    "read_file",
    "read_records",
    "resolve_dataset",
    "split_eval",
]
