"""The report's charts, drawn by matplotlib as SVG to inline in the page.

Matplotlib draws on the server side: the page carries finished vector drawings, no script
and nothing to fetch, and its size depends on the number of buckets, never on the job's.
Text stays text (`svg.fonttype: none`): smaller than glyph outlines, and selectable.
Only the object-oriented API is used (`Figure`, never pyplot): no global state, no GUI
backend. Nothing drawn here comes from the store but numbers and validated account IDs.
"""

from __future__ import annotations

import io
from datetime import UTC
from typing import TYPE_CHECKING

from bulkdisconnect.model import is_valid_stripe_account
from bulkdisconnect.store import LaneCounts

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

    from bulkdisconnect.report_html.facts import Timeline

# One colour per outcome, the same in every chart and table of the page.
COLOURS = {
    "disconnected": "#2f855a",
    "not_found": "#718096",
    "invalid_id": "#b7791f",
    "failed": "#c53030",
    None: "#cbd5e0",  # still to call
}
RATE_LIMITED = "#dd6b20"
REQUESTS = "#2b6cb0"
TARGET = "#1a202c"
LANES_DRAWN = 20  # connected accounts in the chart; the table lists more
WIDTH_INCHES = 10.5  # the page's text width at 96 px an inch


class ChartsUnavailableError(ImportError):
    """matplotlib is not installed (it comes with the `html` extra)."""


def check_available() -> None:
    """Raise ChartsUnavailableError unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ChartsUnavailableError(str(exc)) from exc


def activity(timeline: Timeline) -> str:
    """Disconnects per bucket (bars), and the 429 answers per bucket (a line) when sampled."""
    fig, ax = _figure(height=3.0)
    edges = _edges(timeline)
    ax.stairs(timeline.disconnected, edges, fill=True, color=COLOURS["disconnected"], alpha=0.85)
    ax.set_ylabel(f"disconnected per {duration(timeline.width)}", color=COLOURS["disconnected"])
    ax.set_ylim(bottom=0)
    _thousands(ax.yaxis)
    if not timeline.sampled:
        ax.spines[["right"]].set_visible(False)
    else:
        right = ax.twinx()
        right.spines[["top"]].set_visible(False)
        right.stairs(timeline.rate_limited, edges, color=RATE_LIMITED, linewidth=1.6)
        right.set_ylabel(f"429 answers per {duration(timeline.width)}", color=RATE_LIMITED)
        right.set_ylim(bottom=0, top=max(1.0, max(timeline.rate_limited) * 1.15))
        _thousands(right.yaxis)
    _time_axis(ax)
    return _svg(fig, "activity")


def rates(timeline: Timeline) -> str:
    """Requests per second against the pacer's target, averaged per bucket."""
    fig, ax = _figure(height=2.6)
    edges = _edges(timeline)
    ax.stairs(timeline.request_rate, edges, color=REQUESTS, linewidth=1.6, label="requests/s")
    ax.stairs(
        timeline.target_rate, edges, color=TARGET, linewidth=1.2, linestyle="--", label="target"
    )
    ax.set_ylabel("per second")
    ax.set_ylim(bottom=0)
    _legend_above(ax, columns=2)
    ax.spines[["right"]].set_visible(False)
    _time_axis(ax)
    return _svg(fig, "rates")


def lanes(found: list[LaneCounts]) -> str:
    """Outcomes per connected account, stacked bars, the LANES_DRAWN largest."""
    drawn = sorted(found, key=lambda lane: -sum(lane.counts.values()))[:LANES_DRAWN]
    fig, ax = _figure(height=0.6 + 0.28 * len(drawn))
    names = [_lane_name(lane.stripe_account) for lane in reversed(drawn)]
    left = [0] * len(drawn)
    for outcome, colour in COLOURS.items():
        widths = [lane.counts.get(outcome, 0) for lane in reversed(drawn)]
        ax.barh(range(len(drawn)), widths, left=left, color=colour, label=outcome or "pending")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(drawn)), names)
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.set_xlabel("accounts")
    _thousands(ax.xaxis)
    ax.spines[["right"]].set_visible(False)
    _legend_above(ax, columns=5)
    return _svg(fig, "lanes")


def _figure(*, height: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_INCHES, height), layout="constrained")
    ax = fig.add_subplot()
    ax.spines[["top"]].set_visible(False)
    ax.grid(axis="y", color="#e2e8f0", linewidth=0.6)
    ax.set_axisbelow(True)
    return fig, ax


def _thousands(axis: Axis) -> None:
    from matplotlib.ticker import StrMethodFormatter

    axis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def _legend_above(ax: Axes, *, columns: int) -> None:
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=columns, frameon=False)


def _edges(timeline: Timeline) -> list[float]:
    """The buckets' edges as matplotlib's dates: days since its epoch, 1970-01-01 UTC."""
    return [
        (timeline.start + i * timeline.width) / 86400 for i in range(len(timeline.disconnected) + 1)
    ]


def _time_axis(ax: Axes) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call] # matplotlib's own
    ax.xaxis.set_major_locator(locator)
    formatter = ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlabel("UTC")


def _svg(fig: Figure, name: str) -> str:
    """The figure as an <svg> element: no XML prolog, ids unique to the chart."""
    import matplotlib

    out = io.StringIO()
    # A fixed salt per chart: the same data draws the same page, and the ids of two charts
    # on one page differ.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    return text[text.index("<svg") :]


def _lane_name(stripe_account: str) -> str:
    if not stripe_account:
        return "(own)"
    return stripe_account if is_valid_stripe_account(stripe_account) else "(not an acct_ ID)"


def duration(seconds: float) -> str:
    """A bucket width in words: '5 s', '10 min', '2 h', '1 day'."""
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
    return f"{seconds:g} s"
