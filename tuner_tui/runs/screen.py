"""Every run on this host, newest first, as `tuner runs` lists them; Enter opens one's dashboard.

The list is read in a worker every couple of seconds; the table is only updated from what it hands back.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import Worker, WorkerState

from engine.jobs import JOB_COLUMNS, job_row, list_jobs
from tuner_tui.errors import failure_text

REFRESH_S = 2.0


class OpenRun(Message):
    """Show this run's dashboard in place of the screen on top."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)


class ShowRuns(Message):
    """Show the runs list in place of the screen on top."""


def read_runs() -> list[dict[str, str]]:
    """The rows to show, each with the run's directory."""
    return [job_row(job) | {"dir": str(job.dir)} for job in list_jobs()]


class RunsScreen(Screen):
    CSS_PATH = "runs.tcss"
    BINDINGS = [Binding("enter", "open", "Open", tooltip="The dashboard of the run under the cursor", show=True)]

    def __init__(self, refresh_s: float = REFRESH_S):
        super().__init__()
        self.refresh_s = refresh_s
        self._dirs: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Static("Runs on this host · Enter opens one", id="title")
        table = DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        table.add_columns(*JOB_COLUMNS)
        yield table
        yield Static("reading the runs…", id="empty")
        yield Footer()

    def on_mount(self) -> None:
        self._read()

    def _read(self) -> None:
        self.run_worker(read_runs, name="reading the runs", group="runs", thread=True, exit_on_error=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "runs" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        if event.state == WorkerState.SUCCESS:
            self._show(event.worker.result)
        else:
            self.query_one("#empty", Static).update(f"cannot read the runs: {failure_text(event.worker.error)}")
        self.set_timer(self.refresh_s, self._read)

    def _show(self, rows: list[dict[str, str]]) -> None:
        """Rows keyed by run id, so the cursor stays on the same run as the list changes."""
        table = self.query_one(DataTable)
        current = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value if table.row_count else None
        table.clear()
        self._dirs = {row["id"]: row["dir"] for row in rows}
        for row in rows:
            table.add_row(*(row[column] for column in JOB_COLUMNS), key=row["id"])
        if current in self._dirs:
            table.move_cursor(row=table.get_row_index(current))
        self.query_one("#empty", Static).update(
            "" if rows else "no runs yet: start one with `tuner` (the wizard) or `tuner train ... --detach`")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(OpenRun(Path(self._dirs[event.row_key.value])))

    def action_open(self) -> None:
        table = self.query_one(DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.post_message(OpenRun(Path(self._dirs[key])))
