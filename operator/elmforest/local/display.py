"""The live progress table of ``elmforest up``: one row per forest and branch.

On a terminal the table is redrawn in place, with events scrolling above it; elsewhere (CI, a
pipe) a row is printed when its phase changes or its progress moves by a tenth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

from elmforest.local.engine import Engine
from elmforest.local.state import ObjectRecord

BAR_WIDTH = 20
HEADER = ("NAME", "DOMAIN", "PHASE", "PROGRESS", "TOK/S", "ETA", "")


@dataclass(frozen=True)
class Row:
    name: str
    domain: str
    phase: str
    step: int = 0
    total: int = 0
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None
    note: str = ""

    def cells(self) -> tuple[str, ...]:
        progress = ""
        if self.total:
            filled = BAR_WIDTH * min(self.step, self.total) // self.total
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            progress = f"[{bar}] {self.step}/{self.total}"
        tps = f"{self.tokens_per_second:,.0f}" if self.tokens_per_second else ""
        return (
            self.name,
            self.domain,
            self.phase,
            progress,
            tps,
            _duration(self.eta_seconds),
            self.note,
        )

    def milestone(self) -> tuple[str, int]:
        """What a line-by-line log reports on: the phase, and progress in tenths."""
        return self.phase, (10 * self.step // self.total if self.total else 0)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def rows(engine: Engine) -> list[Row]:
    table = []
    for forest in engine.state.forests.values():
        status = forest.status
        progress = engine.progress.get(forest.name)
        table.append(
            Row(
                name=forest.name,
                domain="(forest)",
                phase=str(status.get("phase", "Pending")),
                step=progress.step if progress else 0,
                total=progress.total_steps if progress else 0,
                tokens_per_second=progress.tokens_per_second if progress else 0.0,
                eta_seconds=progress.eta_seconds if progress else None,
                note=f"{status.get('expertCount', 0)} experts",
            )
        )
        for cluster_set in engine.state.cluster_sets.values():
            if cluster_set.spec.get("forest") == forest.name:
                table.append(_cluster_set_row(cluster_set))
        for branch in sorted(engine.branches_of(forest.name), key=lambda b: b.name):
            status = branch.status
            job = engine.state.jobs.get(str(status.get("jobName")))
            phase = str(status.get("phase", "Pending"))
            note = str(status.get("message", "")) if phase in ("Failed", "Waiting") else ""
            if job is not None and engine.runner.queued(job) and phase not in ("Merged", "Failed"):
                note = "queued for a free slot"
            info = status.get("progress") or {}
            table.append(
                Row(
                    name=branch.name,
                    domain=str(branch.spec.get("domain", "")),
                    phase=phase,
                    step=int(info.get("step", 0)),
                    total=int(info.get("totalSteps", 0)),
                    tokens_per_second=float(info.get("tokensPerSecond", 0.0)),
                    eta_seconds=info.get("etaSeconds"),
                    note=note,
                )
            )
    return table


def _cluster_set_row(record: ObjectRecord) -> Row:
    status = record.status
    phase = str(status.get("phase", "Pending"))
    sizes = status.get("clusterSizes") or []
    note = str(status.get("message", "")) if phase in ("Failed", "Pending") else ""
    if sizes and not note:
        note = f"{len(sizes)} clusters of {status.get('documents', 0)} documents"
    return Row(
        name=record.name,
        domain="(clusters)",
        phase=phase,
        step=0,
        total=0,
        tokens_per_second=0.0,
        eta_seconds=None,
        note=note,
    )


def format_table(table: list[Row]) -> list[str]:
    cells = [HEADER, *(row.cells() for row in table)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]


class Display:
    def __init__(self, stream: TextIO, live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._drawn = 0
        self._milestones: dict[str, tuple[str, int]] = {}
        self._table: list[Row] = []

    def event(self, line: str) -> None:
        self._clear()
        self.stream.write(f"{time.strftime('%H:%M:%S')}  {line}\n")
        self._draw()

    def render(self, table: list[Row]) -> None:
        self._table = table
        if self.live:
            self._clear()
            self._draw()
            return
        for row in table:
            if self._milestones.get(row.name) != row.milestone():
                self._milestones[row.name] = row.milestone()
                line = "  ".join(c for c in row.cells() if c)
                self.stream.write(f"{time.strftime('%H:%M:%S')}  {line}\n")
        self.stream.flush()

    def close(self) -> None:
        """Leave the last table on screen (live) and end with a newline-clean state."""
        self._drawn = 0
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.live or not self._table:
            self.stream.flush()
            return
        lines = format_table(self._table)
        self.stream.write("\n".join(lines) + "\n")
        self._drawn = len(lines)
        self.stream.flush()
