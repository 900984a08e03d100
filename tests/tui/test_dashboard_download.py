"""The dashboard of a run that downloads its model before the first step: bytes, speed and ETA in the progress
panel, replaced by the steps once training starts."""

from __future__ import annotations

import json
import time

from textual.widgets import ProgressBar
from test_dashboard import append, dashboard, log_event, running_run, sampled, stats
from tui_helpers import until


def download_event(done: int, total: int = 13_500_000_000) -> str:
    return json.dumps({"time": time.time(), "type": "download", "file": "model-00001-of-00002.safetensors",
                       "done": done, "total": total, "speed": 45_000_000.0, "eta_s": (total - done) / 45e6}) + "\n"


async def test_a_download_shows_bytes_speed_and_eta_then_the_steps(tmp_path, sleeper):
    run_dir = running_run(tmp_path, sleeper.pid)
    append(run_dir / "events.jsonl", download_event(2_100_000_000))
    app = dashboard(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: sampled(app)() and "downloading" in stats(app), "the download's progress")
        assert stats(app) == ("downloading the model: model-00001-of-00002.safetensors  2.1 GB / 13.5 GB (16%)  "
                              "45.0 MB/s  ETA 4m13s")
        bar = app.screen.query_one(ProgressBar)
        assert (bar.total, bar.progress) == (13_500_000_000, 2_100_000_000)

        append(run_dir / "events.jsonl", download_event(13_500_000_000))
        append(run_dir / "events.jsonl", json.dumps({"time": time.time(), "type": "start"}) + "\n")
        append(run_dir / "events.jsonl", log_event(5, 2.5, total=100) + "\n")
        await until(pilot, lambda: stats(app).startswith("step 5/100"), "the steps after the download")
        assert "downloading" not in stats(app)
