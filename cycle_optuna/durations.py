"""Durations as people read them (no heavy imports: the CLI's --help path uses it)."""

from __future__ import annotations


def seconds_text(seconds: float) -> str:
    """A duration as people read it: 9.9 s, 4 min 12 s, 2 h 05 min."""
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
