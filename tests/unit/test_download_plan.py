"""What a download plans from a hub repo's file list, the disk check at its boundary, and the download fold watchers
read from a run's events."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.models.download import eta_clock as clock, progress_line
from engine.errors import UserError
from engine.models.download import DISK_MARGIN_BYTES, DownloadPlan, DownloadProgress, human_bytes, require_room, \
    run_files
from engine.rundir.series import History

SHARDED_REPO = [
    ".gitattributes", "README.md", "LICENSE.txt", "USE_POLICY.md", "config.json", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model", "onnx/model.onnx",
    "model-q4.gguf", "consolidated.safetensors",
]


def test_run_files_are_the_tokenizer_config_and_safetensors_weights_with_config_last():
    assert run_files("org/llama", SHARDED_REPO) == [
        "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json",
    ]


def test_run_files_keep_a_remote_code_models_python_and_a_tiktoken_vocabulary():
    names = ["config.json", "model.safetensors", "modeling_x.py", "tokenization_x.py", "qwen.tiktoken", "x.png"]
    assert run_files("org/x", names) == ["modeling_x.py", "qwen.tiktoken", "tokenization_x.py", "model.safetensors",
                                         "config.json"]


def test_repo_without_safetensors_is_refused_in_one_line():
    with pytest.raises(UserError) as error:
        run_files("org/old", ["config.json", "pytorch_model.bin", "tokenizer.json"])
    assert error.value.message == "org/old ships no safetensors weights"
    assert "safetensors only" in error.value.hint


def test_adapter_repo_is_refused_with_where_it_belongs():
    with pytest.raises(UserError) as error:
        run_files("org/lora", ["adapter_config.json", "adapter_model.safetensors"])
    assert error.value.message == "org/lora has no config.json" and "adapter_name_or_path" in error.value.hint


def plan(missing: int, free: int) -> DownloadPlan:
    return DownloadPlan("org/big", "main", "0" * 40, (), missing, missing, Path("/cache/hub"), free)


def test_disk_check_passes_with_the_margin_exactly_free_and_refuses_one_byte_less():
    require_room(plan(13_500_000_000, 13_500_000_000 + DISK_MARGIN_BYTES))
    with pytest.raises(UserError) as error:
        require_room(plan(13_500_000_000, 13_500_000_000 + DISK_MARGIN_BYTES - 1))
    assert error.value.message == ("org/big needs 1 B more: 13.5 GB to download and a 1.0 GB margin, 14.5 GB free "
                                   "at /cache/hub")
    assert error.value.hint == "free space or point HF_HOME/HF_HUB_CACHE at a larger disk"


def test_nothing_missing_needs_no_room():
    require_room(plan(0, 0))


def test_sizes_and_durations_read_as_the_hub_and_a_clock_write_them():
    assert [human_bytes(n) for n in (0, 999, 56_720, 2_630_312, 13_476_839_424)] == [
        "0 B", "999 B", "56.7 kB", "2.6 MB", "13.5 GB"]
    assert [clock(s) for s in (None, 0, 59.9, 236, 3720)] == ["?", "0s", "59s", "3m56s", "1h02m"]
    line = progress_line(DownloadProgress(1_200_000_000, 13_500_000_000, 52_100_000, 236, "model-00001.safetensors"))
    assert line == "model-00001.safetensors  1.2 GB / 13.5 GB (9%)  52.1 MB/s  ETA 3m56s"


def download_event(done, total, **extra) -> dict:
    return {"time": 1.0, "type": "download", "file": "model.safetensors", "done": done, "total": total,
            "speed": 1e6, "eta_s": 3.0, **extra}


def test_history_gives_the_latest_download_progress_until_the_download_is_over():
    history = History()
    assert history.download_progress() is None
    history.add(download_event(100, 400))
    history.add(download_event(300, 400))
    assert history.download_progress() == DownloadProgress(300, 400, 1e6, 3.0, "model.safetensors")
    history.add(download_event(400, 400))
    assert history.download_progress() is None


@pytest.mark.parametrize("ending", [{"type": "start"}, {"type": "end", "state": "stopped"}])
def test_training_starting_or_the_run_ending_clears_the_download(ending):
    history = History()
    history.add(download_event(100, 400))
    history.add({"time": 2.0, **ending})
    assert history.download_progress() is None


@pytest.mark.parametrize("event", [download_event("100", 400), download_event(100, None), download_event(True, 4),
                                   download_event(-1, 400), download_event(1, 2**60)])
def test_corrupt_download_events_show_no_progress(event):
    history = History()
    history.add(event)
    assert history.download_progress() is None


def test_a_corrupt_speed_or_eta_is_left_unknown():
    history = History()
    history.add(download_event(1, 4, speed="fast", eta_s=1e308, file=7))
    assert history.download_progress() == DownloadProgress(1, 4, None, None, "")
