"""An in-memory destination (like dlt's `dummy`): keeps the audience in a dict, injects failures.

It is a real `Destination` subclass, so the engine runs unchanged against it; tests read the
resulting audience from `MemoryDestination.audiences[audience_id]`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, ClassVar

from connector.errors import BatchFailedError, TransientError
from destinations.base import (
    Acknowledged,
    Batch,
    BatchResult,
    Destination,
    DestinationOptions,
    Member,
    Rejection,
)

Audience = dict[str, dict[str, Any]]


class MemoryOptions(DestinationOptions):
    batch_size: int = 3
    hashed: bool = False


class MemoryDestination(Destination):
    name = "memory"
    options_model = MemoryOptions
    supports_update = True
    requires_audience = True

    audiences: ClassVar[dict[str, Audience]] = {}
    reject: ClassVar[Callable[[Member], str | None]] = staticmethod(lambda m: None)
    fail_batch: ClassVar[Callable[[str, Batch], Exception | None]] = staticmethod(lambda a, b: None)
    lose_answer: ClassVar[Callable[[str, Batch], bool]] = staticmethod(lambda a, b: False)
    """True for a batch that is applied but whose answer never reaches winback (a timeout)."""
    platform_ids: ClassVar[itertools.count[int]] = itertools.count(1)
    calls: ClassVar[list[tuple[str, int]]] = []

    @classmethod
    def reset(cls) -> None:
        cls.audiences = {}
        cls.reject = staticmethod(lambda m: None)
        cls.fail_batch = staticmethod(lambda a, b: None)
        cls.lose_answer = staticmethod(lambda a, b: False)
        cls.calls = []

    @property
    def audience(self) -> Audience:
        return self.audiences.setdefault(self.context.audience or "", {})

    @property
    def batch_size(self) -> int:
        return int(getattr(self.options, "batch_size", 3))

    def check(self) -> str:
        return f"memory audience {self.context.audience}"

    def _run(self, action: str, batch: Batch, apply: Callable[[Member], str | None]) -> BatchResult:
        self.calls.append((action, len(batch)))
        failure = self.fail_batch(action, batch)
        if failure is not None:
            raise failure
        result = BatchResult()
        for member in batch.members:
            reason = self.reject(member) if action != "remove" else None
            if reason:
                result.rejected.append(Rejection(member.key, reason))
                continue
            result.acknowledged.append(Acknowledged(member.key, apply(member)))
        if self.lose_answer(action, batch):
            raise BatchFailedError("injected: applied, but the answer was lost")
        return result

    def add(self, batch: Batch) -> BatchResult:
        def apply(member: Member) -> str:
            existing = self.audience.get(member.key)
            platform_id = existing["platform_id"] if existing else f"p{next(self.platform_ids)}"
            self.audience[member.key] = {
                "identifiers": dict(member.identifiers),
                "fields": dict(member.fields),
                "platform_id": platform_id,
            }
            return platform_id

        return self._run("add", batch, apply)

    def update(self, batch: Batch) -> BatchResult:
        def apply(member: Member) -> str | None:
            if member.key not in self.audience:
                raise BatchFailedError(f"update of unknown member {member.key}")
            assert member.platform_id == self.audience[member.key]["platform_id"]
            self.audience[member.key].update(
                identifiers=dict(member.identifiers), fields=dict(member.fields)
            )
            return member.platform_id

        return self._run("update", batch, apply)

    def remove(self, batch: Batch) -> BatchResult:
        def apply(member: Member) -> str | None:
            self.audience.pop(member.key, None)
            return member.platform_id

        return self._run("remove", batch, apply)


def transient(message: str = "injected 503") -> TransientError:
    return TransientError(message, status=503)


class HashedMemoryDestination(MemoryDestination):
    """Matches on identifiers, like ad platforms: the audience is a set of identities."""

    name = "memory_hashed"
    supports_update = False
    matches_on_identifiers = True

    @staticmethod
    def identity(member: Member) -> str:
        return "|".join(f"{k}={v}" for k, v in sorted(member.identifiers.items()))

    def add(self, batch: Batch) -> BatchResult:
        def apply(member: Member) -> None:
            self.audience[self.identity(member)] = {"key": member.key}

        return self._run("add", batch, apply)

    def remove(self, batch: Batch) -> BatchResult:
        def apply(member: Member) -> None:
            self.audience.pop(self.identity(member), None)

        return self._run("remove", batch, apply)


class KeyedMemoryDestination(MemoryDestination):
    """Knows members by the key and has no update call: re-adding a key replaces its
    identifiers, as platforms keyed by an external id do."""

    name = "memory_keyed"
    supports_update = False


class LimitedMemoryDestination(MemoryDestination):
    """Takes at most 1 removal per call, as platforms whose delete calls are smaller."""

    name = "memory_limited"

    def max_batch_size(self, action: str) -> int | None:
        return 1 if action == "remove" else None
