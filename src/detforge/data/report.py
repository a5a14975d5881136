"""Problem reports: what an import, load or validation found, fixed or skipped, counted by kind.

Nothing is dropped silently: every skip and fix is recorded here and printed once, grouped by kind
("Skipped 3 annotations: zero-area box (first: 'img_01.jpg', annotation 7)").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from detforge.errors import DatasetError

Severity = Literal["error", "warning", "fixed", "skipped"]
_ORDER: tuple[Severity, ...] = ("error", "skipped", "fixed", "warning")


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` groups findings ("zero-area box"); ``where`` names file, image, annotation."""

    severity: Severity
    kind: str
    where: str
    detail: str = ""
    annotation_id: int | None = None

    def __str__(self) -> str:
        text = f"{self.where}: {self.kind}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class Report:
    """All findings about one source (a file or folder)."""

    source: str
    problems: list[Problem] = field(default_factory=list)

    def add(
        self, severity: Severity, kind: str, where: str, detail: str = "", *, annotation_id: int | None = None
    ) -> None:
        self.problems.append(Problem(severity, kind, where, detail, annotation_id))

    def error(self, kind: str, where: str, detail: str = "", *, annotation_id: int | None = None) -> None:
        self.add("error", kind, where, detail, annotation_id=annotation_id)

    def warning(self, kind: str, where: str, detail: str = "") -> None:
        self.add("warning", kind, where, detail)

    def fixed(self, kind: str, where: str, detail: str = "") -> None:
        self.add("fixed", kind, where, detail)

    def skipped(self, kind: str, where: str, detail: str = "") -> None:
        self.add("skipped", kind, where, detail)

    def extend(self, other: Report) -> None:
        self.problems.extend(other.problems)

    def of(self, severity: Severity) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self.of("error")

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> Counter[tuple[Severity, str]]:
        """How many findings of each (severity, kind)."""
        return Counter((p.severity, p.kind) for p in self.problems)

    def summary_lines(self, *, examples: int = 3) -> list[str]:
        """One line per (severity, kind) with its count and the first few places, errors first."""
        lines = []
        counts = self.counts()
        for severity in _ORDER:
            for (sev, kind), n in sorted(counts.items()):
                if sev != severity:
                    continue
                first = [p for p in self.problems if p.severity == sev and p.kind == kind][:examples]
                places = "; ".join(str(p.where) + (f" ({p.detail})" if p.detail else "") for p in first)
                more = f"; … {n - len(first)} more" if n > len(first) else ""
                lines.append(f"{_VERB[severity]} {n}: {kind} — {places}{more}")
        return lines

    def raise_for_errors(self, *, what_to_do: str = "") -> None:
        """Raise a DatasetError listing the errors (grouped) when there are any."""
        if self.ok:
            return
        lines = [ln for ln in self.summary_lines() if ln.startswith(_VERB["error"])]
        hint = f"\n{what_to_do}" if what_to_do else ""
        raise DatasetError(f"{self.source}: {len(self.errors)} error(s):\n  " + "\n  ".join(lines) + hint)

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "counts": {f"{s}: {k}": n for (s, k), n in sorted(self.counts().items())},
            "problems": [p.__dict__ for p in self.problems],
        }


_VERB: dict[Severity, str] = {"error": "Error", "skipped": "Skipped", "fixed": "Fixed", "warning": "Warning"}
