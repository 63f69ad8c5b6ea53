"""The demo's trace: events as JSON lines, and a sequence diagram drawn from them.

A trace line is one JSON object::

    {"t": 0.42, "kind": "message", "from": "seoul", "to": "washington",
     "label": "submit 3f2a…", "status": "ok", "detail": {...}}

``kind`` is ``message`` (an arrow between two parties), ``note`` (something a party did
or saw on its own), or ``step`` (a heading: one step of the story, with its verdict).
``status`` is ``ok``, ``refused`` (a refusal the story expects) or ``fail`` (something
that should not have happened).

:func:`render_html` draws a trace as a self-contained HTML page holding one SVG: a
lifeline per party, arrows for messages, boxes for notes, a band per step. No script,
no external resource: the page can be opened from disk or mailed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, TextIO

__all__ = ["TraceEvent", "TraceWriter", "read_trace", "render_html", "render_svg"]

KINDS = ("message", "note", "step")
STATUSES = ("ok", "refused", "fail")


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One event of the exchange, as the demo saw it."""

    t: float
    kind: str
    label: str
    source: str = ""
    target: str = ""
    status: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The event as a trace line's object (``source``, ``target`` become ``from``, ``to``)."""
        return {
            "t": round(self.t, 4),
            "kind": self.kind,
            "from": self.source,
            "to": self.target,
            "label": self.label,
            "status": self.status,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, value: Any) -> TraceEvent:
        """Parse one trace line's object. Raises ValueError when it is not one."""
        if not isinstance(value, dict):
            raise ValueError("a trace line is a JSON object")
        kind = value.get("kind")
        status = value.get("status", "ok")
        if kind not in KINDS or status not in STATUSES:
            raise ValueError(f"unknown kind {kind!r} or status {status!r}")
        detail = value.get("detail") or {}
        return cls(
            t=float(value.get("t", 0.0)),
            kind=kind,
            label=str(value.get("label", "")),
            source=str(value.get("from", "")),
            target=str(value.get("to", "")),
            status=status,
            detail=detail if isinstance(detail, dict) else {},
        )


class TraceWriter:
    """Collects events in memory and, when given a file, appends each as a JSON line."""

    def __init__(self, handle: TextIO | None = None) -> None:
        self.events: list[TraceEvent] = []
        self._handle = handle

    def add(self, event: TraceEvent) -> TraceEvent:
        """Keep ``event`` and, with a file, append it as one JSON line and flush; returns it.

        Raises:
            TypeError: with a file, ``detail`` holds a value JSON cannot encode (the event is
                kept in :attr:`events` all the same).
            OSError: the file cannot be written.
        """
        self.events.append(event)
        if self._handle is not None:
            self._handle.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
            self._handle.flush()
        return event


def read_trace(path: Path) -> list[TraceEvent]:
    """Read a trace file written by the demo. Raises ValueError on a bad line, OSError."""
    events = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                events.append(TraceEvent.from_json(json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return events


# --- drawing ------------------------------------------------------------------------------

LANE = 250  # horizontal distance between lifelines
MARGIN = 150  # left margin, room for time stamps and the first notes
ROW = 30  # vertical space per event
TOP = 70  # room for the party headings
NOTE_WIDTH = 220
COLORS = {"ok": "#1f6feb", "refused": "#c2410c", "fail": "#b91c1c"}
STEP_FILL = {"ok": "#eef6ee", "refused": "#fdf2e9", "fail": "#fde8e8"}


def _parties(events: Sequence[TraceEvent], preferred: Sequence[str]) -> list[str]:
    seen = [p for p in preferred]
    for event in events:
        for party in (event.source, event.target):
            if party and party not in seen:
                seen.append(party)
    used = {p for e in events for p in (e.source, e.target) if p}
    return [p for p in seen if p in used] or list(preferred)


def _text(x: float, y: float, text: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.0f}" y="{y:.0f}"{extra}>{escape(text)}</text>'


def _short(text: str, limit: int = 44) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_svg(
    events: Iterable[TraceEvent], parties: Sequence[str] = ("seoul", "washington", "tokyo")
) -> str:
    """Draw ``events`` as an SVG sequence diagram; returns the ``<svg>`` element."""
    events = list(events)
    lanes = _parties(events, parties)
    x_of = {party: MARGIN + i * LANE for i, party in enumerate(lanes)}
    width = MARGIN + LANE * max(len(lanes) - 1, 0) + NOTE_WIDTH + 40
    height = TOP + ROW * (len(events) + 1) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="12">',
        "<defs>",
    ]
    for status, color in COLORS.items():
        out.append(
            f'<marker id="arrow-{status}" viewBox="0 0 10 10" refX="10" refY="5" '
            f'markerWidth="8" markerHeight="8" orient="auto-start-reverse">'
            f'<path d="M 0 0 L 10 5 L 0 10 z" fill="{color}"/></marker>'
        )
    out.append("</defs>")
    out.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    bottom = height - 10
    for party, x in x_of.items():
        out.append(
            f'<line x1="{x}" y1="{TOP - 20}" x2="{x}" y2="{bottom}" stroke="#9ca3af" '
            f'stroke-dasharray="4 4"/>'
        )
        out.append(
            f'<rect x="{x - 60}" y="{TOP - 50}" width="120" height="28" rx="6" fill="#111827"/>'
        )
        out.append(
            _text(
                x,
                TOP - 31,
                party.capitalize(),
                text_anchor="middle",
                fill="white",
                font_weight="bold",
            )
        )
    for row, event in enumerate(events):
        y = TOP + ROW * row + ROW // 2
        color = COLORS[event.status]
        out.append(_text(8, y + 4, f"{event.t:7.2f}s", fill="#6b7280", font_family="monospace"))
        if event.kind == "step":
            fill = STEP_FILL[event.status]
            out.append(
                f'<rect x="60" y="{y - ROW // 2 + 3}" width="{width - 70}" height="{ROW - 6}" '
                f'fill="{fill}" rx="4"/>'
            )
            out.append(_text(70, y + 4, event.label, font_weight="bold", fill=color))
            continue
        source = x_of.get(event.source)
        target = x_of.get(event.target)
        if event.kind == "message" and source is not None and target is not None:
            if source == target:
                target = source + 40
            direction = 1 if target > source else -1
            out.append(
                f'<line x1="{source}" y1="{y + 6}" x2="{target - 2 * direction}" y2="{y + 6}" '
                f'stroke="{color}" stroke-width="1.6" marker-end="url(#arrow-{event.status})"'
                + (' stroke-dasharray="6 3"' if event.status != "ok" else "")
                + "/>"
            )
            out.append(
                _text(
                    (source + target) / 2,
                    y,
                    _short(event.label, LANE // 6),
                    text_anchor="middle",
                    fill=color,
                )
            )
            continue
        # A note: a box beside its party's lifeline.
        x = (source if source is not None else MARGIN) + 8
        out.append(
            f'<rect x="{x}" y="{y - ROW // 2 + 4}" width="{NOTE_WIDTH}" height="{ROW - 8}" '
            f'rx="3" fill="#fffbea" stroke="{color}"/>'
        )
        out.append(_text(x + 6, y + 4, _short(event.label, NOTE_WIDTH // 6), fill="#111827"))
    out.append("</svg>")
    return "\n".join(out)


def render_html(events: Iterable[TraceEvent], *, title: str = "tisa demo exchange") -> str:
    """A self-contained HTML page with the sequence diagram and a table of the events."""
    events = list(events)
    rows = "\n".join(
        f"<tr class={escape(e.status)!r}><td>{e.t:.2f}</td><td>{escape(e.kind)}</td>"
        f"<td>{escape(e.source)}</td><td>{escape(e.target)}</td><td>{escape(e.label)}</td>"
        f"<td><code>{escape(json.dumps(e.detail, sort_keys=True))}</code></td></tr>"
        for e in events
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #111827; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 2em; }}
td, th {{ border-bottom: 1px solid #e5e7eb; padding: 3px 8px; text-align: left; }}
tr.refused td {{ color: #c2410c; }} tr.fail td {{ color: #b91c1c; font-weight: bold; }}
code {{ font-size: 11px; color: #4b5563; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p>Seoul and Tokyo never talk directly: every report goes through the Washington relay,
which holds only ciphertext and forwards a report only with Seoul's release token.</p>
{render_svg(events)}
<table><tr><th>t (s)</th><th>kind</th><th>from</th><th>to</th><th>event</th><th>detail</th></tr>
{rows}
</table></body></html>
"""
