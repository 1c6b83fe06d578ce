"""The help screen: every key and slash command."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from .commands import COMMANDS

KEYS = (
    ("Enter", "send the message (or run a /command)"),
    ("Esc", "cancel the reply being generated"),
    ("Ctrl+N", "new conversation"),
    ("F1", "this help"),
    ("F2", "show or hide the stats and expert map"),
    ("Ctrl+P", "command palette: policy, miss policy, budget, prefetch, …"),
    ("Ctrl+Q", "quit"),
)


def help_text() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_row(Text("Keys", style="bold underline"), "")
    for key, what in KEYS:
        table.add_row(Text(key, style="bold"), what)
    table.add_row("", "")
    table.add_row(Text("Commands", style="bold underline"), "")
    for name, (arg, what) in COMMANDS.items():
        table.add_row(Text(f"/{name} {arg}".rstrip(), style="bold"), what)
    table.add_row("", "")
    table.add_row(Text("Panels", style="bold underline"), "")
    table.add_row(
        Text("stats", style="bold"),
        "decode tok/s (sparkline: recent history), prompt tok/s, expert hit rate, prefetch "
        "usefulness, substitutions, experts computed on the CPU, GPU-tier bytes against the budget, "
        "process RSS, and whether the figures come from a measured or a modelled clock",
    )
    table.add_row(
        Text("experts", style="bold"),
        "a row per layer, a cell per expert: a bar ▁…█ is resident in the GPU tier, "
        "its height and colour its heat (share of recent tokens routed to it); · not resident; ▒ not resident "
        "but used lately (misses). Right: the layer's hit rate. Wide models put several experts in a cell "
        "(its hottest); many layers scroll.",
    )
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: round $accent; border-title-align: center; padding: 0 1; background: $surface;
    }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_title = "localmoe chat — help (Esc closes)"
            yield Static(help_text(), id="help-text")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
