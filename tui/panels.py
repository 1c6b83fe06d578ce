"""The live panels: cache statistics with a decode-speed sparkline, and the expert map.

Both read only frozen `localmoe.Stats` snapshots. The arithmetic (rates, heat, the map's text) is
in plain classes and functions so tests can check it without running the app."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Sparkline, Static

from localmoe.stats import Stats


# -- formatting ---------------------------------------------------------------------------------
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def clock_label(clock: str) -> str:
    """ "measured" or "modelled (PROFILE)" from a Stats.clock value such as "modelled:laptop-8gb"."""
    kind, _, profile = clock.partition(":")
    return f"{kind} ({profile})" if profile else kind


def tps(x: float) -> str:
    """A tokens/s figure in at most 5 characters."""
    if x < 100:
        return f"{x:.1f}"
    if x < 10000:
        return f"{x:.0f}"
    return f"{x / 1000:.0f}k"


def _rate(num: int, den: int) -> str:
    return f"{num / den:.0%}" if den else "—"


class DecodeRate:
    """Decode tokens/s per refresh interval, from successive snapshots.

    A snapshot holds the current reply's decode tokens and their average rate (on the runtime's
    clock, measured or modelled); the time they took is tokens / rate, so the rate over the last
    interval is Δtokens / Δseconds — the same clock, without mixing in the UI's wall clock."""

    def __init__(self, history: int = 60):
        self.samples: deque[float] = deque(maxlen=history)
        self._tokens = 0
        self._seconds = 0.0

    def update(self, st: Stats) -> float | None:
        tokens = st.decode_tokens
        seconds = tokens / st.decode_tps if st.decode_tps > 0 else 0.0
        if tokens < self._tokens:  # a new reply started
            self._tokens, self._seconds = 0, 0.0
        d_tok, d_sec = tokens - self._tokens, seconds - self._seconds
        self._tokens, self._seconds = tokens, seconds
        if d_tok > 0 and d_sec > 0:
            rate = d_tok / d_sec
            self.samples.append(rate)
            return rate
        return None


class ExpertHeat:
    """How hot each expert is: the share of recent tokens routed to it, per layer.

    Uses per expert come as running totals (`LayerStats.expert_uses`); the deltas between
    snapshots go into an exponentially decayed sum that forgets a factor `decay` per token, so the
    map shows roughly the last 1/(1-decay) tokens and stays put while the model is idle."""

    def __init__(self, n_layer: int, n_expert: int, top_k: int, decay: float = 0.85):
        self.top_k = max(1, top_k)
        self.decay = decay
        self.heat = np.zeros((n_layer, n_expert))
        self.total = np.zeros((n_layer, n_expert))
        self._uses: np.ndarray | None = None
        self._tokens = 0

    def update(self, st: Stats) -> bool:
        """Fold in a snapshot; True when anything changed."""
        if not st.layers:
            return False
        uses = np.array([layer.expert_uses for layer in st.layers], dtype=np.float64)
        if uses.shape != self.heat.shape:
            self.heat = np.zeros(uses.shape)
            self._uses = None
        self.total = uses
        if self._uses is None:
            self._uses, self._tokens = uses, st.tokens
            return True
        delta = np.clip(uses - self._uses, 0, None)  # negative only if the counters were reset
        d_tok = max(st.tokens - self._tokens, 0)
        self._uses, self._tokens = uses, st.tokens
        if not delta.any():
            return False
        # tokens that routed through the layers this time (at least what the uses imply)
        n = max(d_tok, int(math.ceil(delta.sum(axis=1).max() / self.top_k)))
        self.heat = self.heat * self.decay**n + delta
        return True

    def share(self) -> np.ndarray:
        """[L, E] in 0..1: the (decayed) fraction of recent tokens that used each expert."""
        tokens = self.heat.sum(axis=1, keepdims=True) / self.top_k
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(tokens > 0, self.heat / tokens, 0.0)
        return np.clip(s, 0.0, 1.0)


# -- the expert map as text ---------------------------------------------------------------------
# A resident expert is a bar whose height and colour grow with its heat (so the map reads without
# colour too); an expert outside the GPU tier is "·", or "▒" when tokens use it anyway (misses).
BARS = "▁▂▃▄▅▆▇█"
HEAT_COLORS = ("#3a4658", "#2f5f9e", "#3380c0", "#33a0a0", "#5cbf6a", "#d6c23c", "#f08a2c", "#ff4a3a")
ABSENT, ABSENT_USED = "·", "▒"
_STYLES = [Style(color=c) for c in HEAT_COLORS]
_DIM = Style(color="#6a7280")


COLD = 0.02  # below this share of recent tokens an expert counts as unused lately


def heat_level(share: float) -> int:
    """0 (unused lately) .. 7 (used by every recent token); sqrt makes small shares visible."""
    if share < COLD:
        return 0
    return min(len(BARS) - 1, 1 + int(math.sqrt(share) * (len(BARS) - 1)))


def map_group(n_layer: int, n_expert: int, width: int) -> int:
    """Experts per cell so that a row (layer label, space, cells) fits in `width` columns."""
    avail = max(1, width - len(str(max(n_layer - 1, 0))) - 1)
    return max(1, math.ceil(n_expert / avail)) if n_expert else 1


def map_text(
    share: np.ndarray, resident: list[set[int]], hit_rates: list[float | None], width: int
) -> tuple[Text, int]:
    """The map for `width` columns: a row per layer, a cell per expert — or per group of experts
    when they do not fit (a group shows its hottest expert, and counts as resident when all of its
    experts are). A hit-rate column is added when there is room. Returns the text and the group size."""
    n_layer, n_expert = share.shape if share.size else (len(resident), 0)
    label_w = len(str(max(n_layer - 1, 0)))
    rate_w = 5  # " 100%"
    avail = max(1, width - label_w - 1)
    group = map_group(n_layer, n_expert, width)
    cells = math.ceil(n_expert / group) if n_expert else 0
    show_rate = avail - cells >= rate_w
    text = Text(no_wrap=True, overflow="crop")
    for layer in range(n_layer):
        if layer:
            text.append("\n")
        text.append(f"{layer:>{label_w}} ", _DIM)
        res = resident[layer] if layer < len(resident) else set()
        for start in range(0, n_expert, group):
            stop = min(start + group, n_expert)
            level = heat_level(float(share[layer, start:stop].max()))
            if all(e in res for e in range(start, stop)):
                text.append(BARS[level], _STYLES[level])
            elif level:
                text.append(ABSENT_USED, _STYLES[level])
            else:
                text.append(ABSENT, _DIM)
        if show_rate:
            rate = hit_rates[layer] if layer < len(hit_rates) else None
            text.append(" " * (avail - cells - rate_w) + (f" {rate:4.0%}" if rate is not None else "    —"), _DIM)
    return text, group


def legend_text() -> Text:
    """▁▄█ resident cold→hot · off ▒ miss"""
    t = Text(no_wrap=True, overflow="ellipsis")
    for i in (0, 4, 7):
        t.append(BARS[i], _STYLES[i])
    t.append(" resident cold→hot ", _DIM)
    t.append(ABSENT, _DIM)
    t.append(" off ", _DIM)
    t.append(ABSENT_USED, _STYLES[6])
    t.append(" miss", _DIM)
    return t


# -- widgets ------------------------------------------------------------------------------------
class ExpertMap(Static):
    """One row per layer; redrawn from the latest heat whenever it or the widget's width changes."""

    DEFAULT_CSS = "ExpertMap { height: auto; width: 1fr; }"

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.share = np.zeros((0, 0))
        self.resident: list[set[int]] = []
        self.hit_rates: list[float | None] = []
        self.group = 1

    def show(self, heat: ExpertHeat, st: Stats) -> None:
        self.share = heat.share()
        self.resident = [set(layer.resident) for layer in st.layers]
        self.hit_rates = [
            layer.hits / (layer.hits + layer.misses) if layer.hits + layer.misses else None for layer in st.layers
        ]
        self.refresh(layout=True)

    def render(self) -> Text:
        if not self.resident:
            return Text("waiting for the model…", style=_DIM)
        text, self.group = map_text(self.share, self.resident, self.hit_rates, max(self.size.width, 8))
        return text

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(1, len(self.resident))


class ExpertPanel(Vertical):
    """The expert map with its legend; scrolls vertically for models with many layers."""

    n_layer = n_expert = 0

    def compose(self) -> ComposeResult:
        yield Static(legend_text(), id="map-legend")
        with VerticalScroll(id="map-scroll"):
            yield ExpertMap(id="expert-map")

    def setup(self, n_layer: int, n_expert: int) -> None:
        self.n_layer, self.n_expert = n_layer, n_expert
        self._title()

    def show(self, heat: ExpertHeat, st: Stats) -> None:
        self.query_one(ExpertMap).show(heat, st)
        self._title()

    def on_resize(self) -> None:
        self.call_after_refresh(self._title)

    def _title(self) -> None:
        if self.n_layer:
            group = map_group(self.n_layer, self.n_expert, max(self.query_one(ExpertMap).size.width, 8))
            self.border_title = f"experts {self.n_layer} layers × {self.n_expert}" + (
                f" ({group}/cell)" if group > 1 else ""
            )


class StatsPanel(Vertical):
    """Decode speed with a sparkline, and the cache counters, from one snapshot."""

    def compose(self) -> ComposeResult:
        yield Static("—", id="stats-speed")
        yield Sparkline([], id="tps-spark")
        yield Static("loading…", id="stats-body")

    def show(self, st: Stats, rate: DecodeRate, rss: int | None, settings: str) -> None:
        speed = Text(no_wrap=True, overflow="ellipsis")
        speed.append(f"{'decode':<9}", "dim")
        speed.append(f"{tps(st.decode_tps)} tok/s", "bold")
        speed.append(f"  prompt {tps(st.prompt_tps)}/s", "dim")
        self.query_one("#stats-speed", Static).update(speed)
        spark = self.query_one("#tps-spark", Sparkline)
        samples = list(rate.samples)
        if samples != list(spark.data or []):
            spark.data = samples
        self.query_one("#stats-body", Static).update(stats_text(st, rss, settings))


def stats_text(st: Stats, rss: int | None, settings: str) -> Text:
    subs = st.substitutions
    budget = human_bytes(st.gpu_budget)
    prefetch = f"{st.prefetch_used} used of {st.prefetch_issued}"
    precision = getattr(st, "prefetch_precision", None)
    clock = clock_label(st.clock)
    wall = getattr(st, "decode_tps_measured", None)
    rows = [
        ("clock", clock, ""),
        ("hit rate", f"{st.hit_rate:.1%}" if st.hits + st.misses else "—", f"{st.hits} hit · {st.misses} miss"),
        (
            "prefetch",
            prefetch,
            f"({_rate(st.prefetch_used, st.prefetch_issued)})"
            if precision is None or not st.prefetch_issued
            else f"precision {precision:.0%}",
        ),
        ("subst", f"buddy {subs.get('buddy', 0)}", f"little {subs.get('little', 0)} · drop {subs.get('drop', 0)}"),
        ("CPU exp", f"{st.cpu_experts}", f"moved {human_bytes(st.bytes_to_gpu)} to GPU"),
        ("GPU tier", human_bytes(st.gpu_bytes_in_use), f"of {budget} ({_rate(st.gpu_bytes_in_use, st.gpu_budget)})")
        if st.gpu_budget is not None
        else ("GPU tier", "all experts", "(no budget)"),
        ("RSS", human_bytes(rss), f"tokens {st.tokens}"),
    ]
    if st.clock != "measured" and wall is not None:  # a modelled clock: say what this machine did
        rows.insert(1, ("wall", f"{tps(wall)} tok/s", "measured here"))
    t = Text(no_wrap=True, overflow="ellipsis")
    for i, (name, value, extra) in enumerate(rows):
        if i:
            t.append("\n")
        t.append(f"{name:<9}", "dim")
        t.append(value, "bold")
        if extra:
            t.append(f" {extra}", "dim")
    t.append("\n")
    t.append(settings, "italic")
    return t
