"""Throughput and latency over time around faults, from the verifying client's
records (like CoRAL figures 4.17 and 4.18): what a user of the service saw.

The records' times are relative to each load run's start; `started` (the
run's time.monotonic() at its start, in its report) puts them on the host's
monotonic clock, where the demo notes its events too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BIN_S = 0.1


@dataclass(frozen=True)
class Event:
    at: float
    """time.monotonic() of the event."""
    label: str


@dataclass(frozen=True)
class Sample:
    end: float
    """time.monotonic() when the reply (or the failure) was complete."""
    latency_ms: float
    ok: bool


def samples(records: Path, started: float) -> list[Sample]:
    """One load run's records (coral load --records) on the monotonic clock."""
    out = []
    for line in records.read_text().splitlines():
        r = json.loads(line)
        if r["target"]:  # an unsolicited reply answers no request
            ok = r["outcome"] == "ok"
            out.append(Sample(started + r["end"], (r["end"] - r["start"]) * 1000, ok))
    return out


def plot(data: Sequence[Sample], events: Sequence[Event], path: Path, title: str) -> None:
    """Requests completed per second and their latency (median and max per 100 ms),
    with the events marked, as a PNG at PATH."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(s.end for s in data)
    bins: dict[int, list[Sample]] = {}
    for s in data:
        bins.setdefault(int((s.end - t0) / BIN_S), []).append(s)
    xs = [i * BIN_S for i in range(max(bins) + 1)]
    rate = [sum(s.ok for s in bins.get(i, [])) / BIN_S for i in range(len(xs))]
    p50, worst = [], []
    for i in range(len(xs)):
        lat = sorted(s.latency_ms for s in bins.get(i, []) if s.ok)
        p50.append(lat[len(lat) // 2] if lat else float("nan"))
        worst.append(lat[-1] if lat else float("nan"))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 7))
    top.plot(xs, rate, lw=1)
    top.set_ylabel("replies/s (ok)")
    bottom.plot(xs, p50, lw=1, label="median")
    bottom.plot(xs, worst, lw=1, label="max")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency, ms")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper right")
    for n, e in enumerate(events, 1):
        for ax in (top, bottom):
            ax.axvline(e.at - t0, color="red", lw=0.8, ls="--")
        top.annotate(str(n), (e.at - t0, max(rate) * 1.02), fontsize=8, color="red", ha="center")
    legend = "\n".join(f"{n}  {e.at - t0:6.2f} s  {e.label}" for n, e in enumerate(events, 1))
    fig.text(0.01, 0.01, legend, fontsize=7, family="monospace", va="bottom")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03 + 0.022 * len(events), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
