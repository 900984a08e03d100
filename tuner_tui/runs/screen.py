"""Every run on this host, newest first, as `tuner runs` lists them; Enter opens one's dashboard, Esc goes back.

The list is read in a worker every couple of seconds; the table is only updated from what it hands back. A narrow
terminal shows the columns that fit, most telling first; the highlighted run's other fields are in the detail below.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import Worker, WorkerState

from engine.rundir.files import printable_line
from engine.rundir.jobs import JOB_COLUMNS, failure_reason, job_row, list_jobs, log_tail
from tuner_tui.errors import failure_text

REFRESH_S = 2.0


class OpenRun(Message):
    """Show this run's dashboard in place of the screen on top."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)


class ShowRuns(Message):
    """Show the runs list in place of the screen on top; Esc there opens ``run_dir``'s dashboard again."""

    def __init__(self, run_dir: Path | None = None):
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None


# The columns a narrow table keeps first; it shows them in JOB_COLUMNS' order.
PRIORITY = ("id", "state", "progress", "loss", "elapsed", "name", "model", "started", "method")
CELL_PADDING = 2  # a DataTable pads each cell by one on either side


def fitting_columns(rows: list[dict], width: int) -> tuple[str, ...]:
    """The columns whose widest cell (or heading) fits in ``width`` cells, taken in PRIORITY order; the id always."""
    widths = {column: max([len(column), *(len(row[column]) for row in rows)]) + CELL_PADDING
              for column in JOB_COLUMNS}
    chosen, used = set(), 0
    for column in PRIORITY:
        if column == "id" or used + widths[column] <= width:
            chosen.add(column)
            used += widths[column]
    return tuple(column for column in JOB_COLUMNS if column in chosen)


def read_runs() -> list[dict]:
    """The rows to show, each with the run's directory and, for a failed run, the last lines of its log."""
    return [job_row(job) | {"dir": printable_line(job.dir), "tail": log_tail(job) if job.state == "failed" else
                            [failure_reason(job)] if job.state == "unreadable" else []}
            for job in list_jobs()]


class RunsScreen(Screen):
    CSS_PATH = "runs.tcss"
    BINDINGS = [
        Binding("escape", "back", "Back", tooltip="The dashboard this list was opened from"),
        Binding("enter", "open", "Open", tooltip="The dashboard of the run under the cursor", priority=True),
    ]

    def __init__(self, refresh_s: float = REFRESH_S, back_to: Path | None = None):
        super().__init__()
        self.refresh_s = refresh_s
        self.back_to = back_to
        self._rows: dict[str, dict] = {}
        self._columns: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static("Runs on this host · Enter opens one" + (" · Esc goes back" if self.back_to else ""),
                     id="title")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("reading the runs…", id="empty", markup=False)
        yield Static("", id="detail", markup=False)
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

    def on_resize(self) -> None:
        if self._rows:
            self._show(list(self._rows.values()))

    def _show(self, rows: list[dict]) -> None:
        """Rows keyed by run id, so the cursor stays on the same run as the list changes; columns keyed by name."""
        table = self.query_one(DataTable)
        current = self._current()
        columns = fitting_columns(rows, table.size.width - table.scrollbar_size_vertical)
        table.clear(columns=columns != self._columns)
        if columns != self._columns:
            self._columns = columns
            for column in columns:
                table.add_column(column, key=column)
        self._rows = {row["id"]: row for row in rows}
        for row in rows:
            table.add_row(*(Text(row[column]) for column in columns), key=row["id"])
        if current in self._rows:
            table.move_cursor(row=table.get_row_index(current))
        self.query_one("#empty", Static).update(
            "" if rows else "no runs yet: start one with `tuner` (the wizard) or `tuner train ... --detach`")
        self._detail()

    def _current(self) -> str | None:
        table = self.query_one(DataTable)
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value if table.row_count else None

    def _detail(self) -> None:
        """The highlighted run's directory, and what a failed run said last."""
        row = self._rows.get(self._current())
        if row is None:
            self.query_one("#detail", Static).update("")
            return
        heading = "failed; the end of its train.log:" if row["state"] == "failed" else f"{row['state']}:"
        hidden = " · ".join(f"{column} {row[column]}" for column in JOB_COLUMNS
                            if column not in self._columns and row[column])
        lines = [row["dir"]] + ([hidden] if hidden else []) + ([heading] + row["tail"] if row["tail"] else [])
        self.query_one("#detail", Static).update("\n".join(lines))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.post_message(OpenRun(Path(self._rows[event.row_key.value]["dir"])))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.back_to is not None if action == "back" else True

    def action_back(self) -> None:
        self.post_message(OpenRun(self.back_to))

    def system_commands(self) -> Iterable[SystemCommand]:
        """The screen's actions for the command palette (the app adds them to its own)."""
        yield SystemCommand("Open run", "The dashboard of the highlighted run", self.action_open)
        if self.back_to is not None:
            yield SystemCommand("Back", "The dashboard this list was opened from", self.action_back)

    def action_open(self) -> None:
        if self._current() in self._rows:
            self.post_message(OpenRun(Path(self._rows[self._current()]["dir"])))
