"""A file picker for the dataset field: folders and the data files the engine reads, chosen by keyboard or mouse."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Footer, Static

from engine.data.registry import FILE_TYPES


def start_folder(*candidates: str | None) -> Path:
    """The first candidate that is a folder, or the folder of one that is a file; else the working directory."""
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if path.is_file():
            path = path.parent
        if path.is_dir():
            return path.resolve()
    return Path.cwd()


class DataFileTree(DirectoryTree):
    """Folders and data files only; hidden ones left out. (Filtering runs in the tree's loading thread.)"""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [path for path in paths if not path.name.startswith(".")
                and (path.suffix in FILE_TYPES or self._safe_is_dir(path))]


class DatasetPicker(ModalScreen[str | None]):
    """Choose a data file: Enter or a click on a file answers its absolute path; Esc answers None."""

    CSS_PATH = "wizard.tcss"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Close without choosing a file"),
        Binding("backspace", "parent", "Parent folder", tooltip="Show the folder above this one"),
        # a modal's footer leaves out the app's keys: Ctrl+Q (the app's, whichever screen is on top) shown here too
        Binding("ctrl+q", "app.quit", "Quit", tooltip="Leave the wizard; a started run goes on"),
    ]

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Static(f"Choose a dataset file ({' '.join(FILE_TYPES)})", id="picker-title")
            yield Static(Content(str(self.folder)), id="picker-folder")
            yield DataFileTree(self.folder, id="picker-tree")
            with Horizontal(id="picker-nav"):
                yield Button("Parent folder", id="parent")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataFileTree).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(str(event.path.resolve()))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        getattr(self, f"action_{event.button.id}")()

    def action_parent(self) -> None:
        tree = self.query_one(DataFileTree)
        tree.path = Path(tree.path).resolve().parent
        self.query_one("#picker-folder", Static).update(Content(str(tree.path)))

    def action_cancel(self) -> None:
        self.dismiss(None)
