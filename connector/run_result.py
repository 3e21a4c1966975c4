"""The record of one run and how several runs combine into one exit code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

EXIT_CODES = {
    "success": 0,
    "dry_run": 0,
    "partial": 3,
    "locked": 5,
    "aborted": 4,
    "failed": 1,
}


@dataclass
class RunResult:
    """The record of one run, as printed by `sync run --output json`."""

    sync: str
    run_id: str
    status: str = "running"
    segment_rows: int = 0
    skipped: int = 0
    planned: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("add", "remove", "update"), 0)
    )
    sent: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("add", "remove", "update"), 0)
    )
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    duration_s: float = 0.0
    error: str | None = None
    samples: dict[str, list[str]] = field(default_factory=dict)
    audience_size: int | None = None
    config_error: bool = False
    """The run failed before sending anything because of the configuration (exit 2)."""

    @property
    def exit_code(self) -> int:
        if self.status == "failed" and self.config_error:
            return 2
        return EXIT_CODES.get(self.status, 1)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sync": self.sync,
            "run_id": self.run_id,
            "status": self.status,
            "segment_rows": self.segment_rows,
            "skipped": self.skipped,
            "planned": dict(self.planned),
            "sent": dict(self.sent),
            "rejected": self.rejected,
            "batches": self.batches,
            "retries": self.retries,
            "duration_s": self.duration_s,
            "error": self.error,
        }
        if self.status == "dry_run":
            data["samples"] = self.samples
        return data

    def counts(self) -> dict[str, int]:
        return {
            "segment_rows": self.segment_rows,
            "skipped": self.skipped,
            "planned_add": self.planned["add"],
            "planned_remove": self.planned["remove"],
            "planned_update": self.planned["update"],
            "sent_add": self.sent["add"],
            "sent_remove": self.sent["remove"],
            "sent_update": self.sent["update"],
            "rejected": self.rejected,
            "batches": self.batches,
            "retries": self.retries,
        }


def combined_exit_code(results: Sequence[RunResult]) -> int:
    """1 if any failed, else 2 (a run stopped by its configuration), else 4, else 5, else 3,
    else 0."""
    codes = {result.exit_code for result in results}
    for code in (1, 2, 4, 5, 3):
        if code in codes:
            return code
    return 0
