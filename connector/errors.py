"""Every error winback raises, branched by what happens next.

::

    WinbackError
    ├── ConfigError              exit 2: bad config or usage, nothing ran
    ├── WarehouseError           the segment could not be read (unreachable, SQL error, bad columns)
    ├── StateError               the state store could not be opened or written
    ├── LockedError              exit 5: another run holds this sync's lock
    ├── GuardError               exit 4: a guard stopped the sync before anything was sent
    └── DestinationError         talking to a destination failed
        ├── TransientError       retry with backoff (connection, timeout, 429, 5xx, throttle codes)
        ├── PayloadTooLargeError the platform refused the batch size: split the batch and resend
        ├── BatchFailedError     this batch failed for good (other 4xx, garbage answer)
        └── FatalDestinationError stop this sync now (401/403, audience missing, bad options)

Rows the destination rejects one by one are not exceptions: adapters return them as
``Rejection`` records, the engine counts and stores them and the run continues.

Each exception builds its own message: what failed, the offending value in backticks and what to
do about it. Only the CLI turns them into text and exit codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class WinbackError(Exception):
    """Root of all winback errors."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file: where (file and TOML path) and what is wrong."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(WinbackError):
    """The config file or command line is unusable; every problem is reported at once."""

    def __init__(self, problems: Sequence[ConfigProblem] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [ConfigProblem("", problems)]
        self.problems = list(problems)
        self.source = source
        lines = [str(p) for p in self.problems]
        header = f"invalid configuration in {source}" if source else "invalid configuration"
        if len(lines) == 1:
            super().__init__(f"{header}: {lines[0]}")
        else:
            super().__init__(header + ":\n" + "\n".join(f"  - {line}" for line in lines))


class WarehouseError(WinbackError):
    """The warehouse could not be reached or the segment query failed."""

    def __init__(self, message: str, *, segment: str | None = None):
        self.segment = segment
        prefix = f"segment `{segment}`: " if segment else ""
        super().__init__(prefix + message)


class StateError(WinbackError):
    """The state store could not be opened, migrated or written."""


class LockedError(WinbackError):
    """Another run currently holds the lock of this sync."""

    def __init__(self, sync: str, owner: str):
        self.sync = sync
        self.owner = owner
        super().__init__(
            f"another run of sync `{sync}` holds its lock ({owner}); wait for it to finish. A "
            "lock whose process is gone is taken over by the next run, and any lock not "
            "refreshed for 30 minutes (the only sign for a run on another machine or in "
            "another container)"
        )


class GuardError(WinbackError):
    """A safety guard refused to send the planned changes."""

    def __init__(self, sync: str, reason: str):
        self.sync = sync
        self.reason = reason
        super().__init__(
            f"nothing was sent: {reason}. Check the segment; if the change is intended, rerun "
            "with --force"
        )


class DestinationError(WinbackError):
    """Base class for failures while talking to a destination.

    `maybe_applied` is False when the request cannot have been applied (the destination refused
    it with a 4xx answer, or never got it): the batch is then simply pending. Otherwise (a 5xx,
    no answer, an error after the answer) the next run treats its rows as unconfirmed."""

    def __init__(
        self,
        message: str,
        *,
        destination: str | None = None,
        status: int | None = None,
        maybe_applied: bool = True,
    ):
        self.destination = destination
        self.status = status
        self.maybe_applied = maybe_applied
        prefix = f"destination `{destination}`: " if destination else ""
        super().__init__(prefix + message)


class TransientError(DestinationError):
    """A failure worth retrying; ``retry_after_s`` is the platform's requested wait, if any.

    Raised once retries are exhausted, it stops the sync. `maybe_applied` is False when the
    request cannot have been processed (a 408, 425 or 429 answer, a connection that failed
    before anything was sent): the batch is then simply pending. Otherwise (a 5xx, a timeout,
    a connection broken after sending) the next run treats its rows as unconfirmed, as for
    `BatchFailedError`."""

    def __init__(
        self,
        message: str,
        *,
        destination: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
        maybe_applied: bool = True,
    ):
        super().__init__(
            message, destination=destination, status=status, maybe_applied=maybe_applied
        )
        self.retry_after_s = retry_after_s


class PayloadTooLargeError(DestinationError):
    """The platform refused the request size; the engine halves the batch and resends.

    `request_bytes` is the size of the refused request body, when known."""

    def __init__(
        self,
        message: str,
        *,
        destination: str | None = None,
        status: int | None = None,
        request_bytes: int | None = None,
        maybe_applied: bool = True,
    ):
        super().__init__(
            message, destination=destination, status=status, maybe_applied=maybe_applied
        )
        self.request_bytes = request_bytes


class BatchFailedError(DestinationError):
    """This batch failed for good; its rows stay pending and the run ends as failed.

    `maybe_applied` is False when the destination's answer says it applied nothing (a 4xx
    refusal, a redirect); otherwise (no usable answer, a job that did not finish) the next run
    treats the batch's rows as unconfirmed (`connector.state.StateStore.settle_unconfirmed`).
    """


class FatalDestinationError(DestinationError):
    """Stop this sync at once (bad credentials, missing audience, refused options); a batch
    refused so (401, 403) is pending (`maybe_applied` False)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's timeout, a container stopping): winback stops as for Ctrl-C."""
