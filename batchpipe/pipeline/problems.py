"""Rows that fail validation, grouped by cause, for the refusal and for ``estimate``.

A template typo makes every row fail for one reason; listing the first twenty rows one by
one hides both how many share it and any other cause. :class:`ProblemTally` counts rows per
cause (the problem's message) and keeps the first few rows of each, so the listing reads
``49,923 rows: column 'body' is null (rows 1, 2, 5, …)``. Memory stays flat: at most
``MAX_CAUSES`` causes are kept, rows of any further cause are counted as "other causes".

Rows are numbered from 1 (row 1 is the first data row). For JSONL a row's file line is
given too where it differs from its row number (blank lines before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchpipe.dataset import Dataset
from batchpipe.requests import RowProblem

MAX_CAUSES = 20  # distinct causes listed; the rest count as "other causes"
SHOWN_ROWS = 5  # first rows named per cause


@dataclass
class _Cause:
    count: int = 0
    first: list[RowProblem] = field(default_factory=list)

    def add(self, problem: RowProblem) -> None:
        self.count += 1
        if len(self.first) < SHOWN_ROWS:
            self.first.append(problem)


@dataclass
class ProblemTally:
    """Invalid rows counted per cause, with the first rows of each (bounded memory)."""

    total: int = 0
    _causes: dict[str, _Cause] = field(default_factory=dict)
    _other: _Cause = field(default_factory=_Cause)

    def add(self, problem: RowProblem) -> None:
        """Count one invalid row under its cause."""
        self.total += 1
        cause = self._causes.get(problem.message)
        if cause is None:
            if len(self._causes) >= MAX_CAUSES:
                self._other.add(problem)
                return
            cause = self._causes[problem.message] = _Cause()
        cause.add(problem)

    def lines(self, dataset: Dataset) -> list[str]:
        """One line per cause, the most common first: ``"3 rows: … (rows 1, 4, 9)"``."""
        groups = sorted(
            self._causes.items(), key=lambda kv: (-kv[1].count, kv[1].first[0].row_index)
        )
        if self._other.count:
            groups.append(("other causes", self._other))
        shown = [p.row_index for _, cause in groups for p in cause.first]
        lines_of = dataset.lines_of(shown)  # one pass over a JSONL file for all of them
        out = []
        for message, cause in groups:
            noun = "row" if cause.count == 1 else "rows"
            where = ", ".join(
                row_location(p.row_index, lines_of.get(p.row_index), p.row_key) for p in cause.first
            )
            more = ", …" if cause.count > len(cause.first) else ""
            label = "row" if len(cause.first) == 1 and not more else "rows"
            out.append(f"{cause.count:,} {noun}: {message} ({label} {where}{more})")
        return out

    def message(self, dataset: Dataset, head: str) -> str:
        """``head`` ("N row(s) failed …") then the causes, one indented line each."""
        causes = len(self._causes) + (1 if self._other.count else 0)
        return (
            f"{dataset.uri}: {self.total:,} row(s) {head} "
            f"({causes} cause{'' if causes == 1 else 's'}):\n  " + "\n  ".join(self.lines(dataset))
        )


def row_location(row_index: int, lineno: int | None, row_key: str | None = None) -> str:
    """Row ``row_index`` (from 0) as messages name it: from 1, with its file line where that
    differs (blank lines) and its id where given: ``4``, ``4 (line 6, id 'd9')``."""
    notes = []
    if lineno is not None and lineno != row_index + 1:
        notes.append(f"line {lineno}")
    if row_key is not None:
        notes.append(f"id {row_key!r}")
    return f"{row_index + 1}" + (f" ({', '.join(notes)})" if notes else "")
