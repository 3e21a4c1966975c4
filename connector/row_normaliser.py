"""Turns a segment row's mapped values into what is sent, in this process or in a second one.

`RowNormaliser` normalises one staged payload for a sync (its identifiers through
`connector.identity`, the destination's accepted and matching identifiers, the sync's default
country). `ChunkNormaliser` does the same for chunks of warehouse rows (a streamed first sync)
and `PayloadNormaliser` for the payload texts the planner reads back from its stage; both also
compute the fingerprints the snapshot keeps. All are plain picklable objects, so a large sync
can hand its chunks to `NormalisingPool`: one more process normalises a chunk while this one
reads the next and sends or plans the previous ones, and normalises some itself when that
process is behind (normalising is most of a large sync's per-row work and Python runs it on one
core per process).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import orjson

from connector.collector import tune_garbage_collector
from connector.errors import WinbackError
from connector.identity import normalise_identifiers
from connector.interrupts import STOPPING_SIGNALS, interrupts_held
from connector.json_text import fingerprinted_text, loads_text

log = logging.getLogger("winback.normalise")

PARALLEL_MIN_ROWS = 20_000
"""Below this many rows the second process costs more (its start, ~0.5 s) than it saves."""


def second_process_pays(rows: int) -> bool:
    """Whether normalising this many rows is worth a second process (and there is a second
    core for it)."""
    return rows >= PARALLEL_MIN_ROWS and (os.cpu_count() or 1) > 1


JSON_NATIVE = frozenset({str, int, float, bool, type(None)})
"""Types `json_value` returns unchanged; checked inline in the per-row loop."""


@dataclass(frozen=True)
class Normalised:
    """A staged row after identity normalisation; `skip_reason` set when it cannot be sent."""

    identifiers: dict[str, str]
    fields: dict[str, Any]
    skip_reason: str | None = None
    dropped: tuple[str, ...] = ()
    """Identifiers left out because they are invalid (the row is sent with the others)."""


@dataclass(frozen=True)
class RowNormaliser:
    """Normalises one payload ``{"i": identifiers, "f": fields}`` for one sync."""

    default_country: str | None
    accepted: frozenset[str]
    """Identifiers the destination takes; others are left out."""
    matching: frozenset[str]
    """A row needs one of these to be sent; without, it is skipped with the reason."""

    def __call__(self, payload: dict[str, Any]) -> Normalised:
        identifiers, problems = self._identifiers(payload)
        fields = payload["f"]
        if self.matching.isdisjoint(identifiers):
            return Normalised(identifiers, fields, skip_reason=self._skip_reason(problems))
        return Normalised(identifiers, fields, dropped=tuple(problems))

    def outcome(self, payload: dict[str, Any]) -> Outcome:
        """`outcome_of(self(payload))` without the intermediate `Normalised` (the per-row path
        of a large first sync)."""
        identifiers, problems = self._identifiers(payload)
        if self.matching.isdisjoint(identifiers):
            return self._skip_reason(problems)
        return Ready.of_values(identifiers, payload["f"], tuple(problems))

    def _identifiers(self, payload: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
        normalised = normalise_identifiers(payload["i"], default_country=self.default_country)
        identifiers = normalised.identifiers
        if not self.accepted.issuperset(identifiers):
            # Config validation refuses identifiers the destination does not accept; this only
            # matters for a config built some other way.
            identifiers = {n: v for n, v in identifiers.items() if n in self.accepted}
        return identifiers, normalised.problems

    def _skip_reason(self, problems: list[str]) -> str:
        why = joined_problems(problems) or "all identifier columns are empty"
        return f"no usable identifier ({', '.join(sorted(self.matching))}): {why}"


def joined_problems(problems: Iterable[str]) -> str:
    """Problems as one sentence: `a; b` (a validator's own full stop dropped)."""
    return "; ".join(problem.rstrip(".") for problem in problems)


class Ready(NamedTuple):
    """A normalised row ready to send, with the texts and fingerprints the snapshot keeps."""

    identifiers: dict[str, str]
    fields: dict[str, Any]
    dropped: tuple[str, ...]
    identifiers_text: str
    identity_fp: str
    fields_text: str
    fields_fp: str

    @classmethod
    def of(cls, new: Normalised) -> Ready:
        return cls.of_values(new.identifiers, new.fields, new.dropped)

    @classmethod
    def of_values(
        cls, identifiers: dict[str, str], fields: dict[str, Any], dropped: tuple[str, ...]
    ) -> Ready:
        identifiers_text, identity_fp = fingerprinted_text(identifiers)
        fields_text, fields_fp = fingerprinted_text(fields)
        return cls(
            identifiers, fields, dropped, identifiers_text, identity_fp, fields_text, fields_fp
        )


Outcome = Ready | str
"""A row's outcome: ready to send, or the reason it is skipped."""


Tag = TypeVar("Tag")
"""What the caller keeps with a job (the rows' keys, a page of candidates)."""

SentOutcomes = bytes | list[Outcome]
"""A chunk's outcomes as a worker returns them (`encode_outcomes`) or as computed here."""


def outcome_of(new: Normalised) -> Outcome:
    """What the planner and the streamed first sync act on: the skip reason, or the row."""
    return new.skip_reason if new.skip_reason is not None else Ready.of(new)


@dataclass(frozen=True)
class PayloadBuilder:
    """Builds the payload ``{"i": identifiers, "f": fields}`` of a warehouse row from the
    positions of the mapped columns; values JSON lacks (dates, decimals...) become JSON-able."""

    identifier_at: tuple[tuple[str, int], ...]
    field_at: tuple[tuple[str, int], ...]

    @classmethod
    def for_columns(
        cls, columns: Sequence[str], identifiers: dict[str, str], fields: dict[str, str]
    ) -> PayloadBuilder:
        """`identifiers` and `fields` map names to the columns (`columns`) holding them."""
        position = {name: index for index, name in enumerate(columns)}
        return cls(
            tuple((n, position[c]) for n, c in identifiers.items()),
            tuple((n, position[c]) for n, c in fields.items()),
        )

    def __call__(self, row: Sequence[Any]) -> dict[str, dict[str, Any]]:
        native, json_value = JSON_NATIVE, _json_value
        return {
            "i": {n: v if type(v := row[i]) in native else json_value(v) for n, i in self.identifier_at},
            "f": {n: v if type(v := row[i]) in native else json_value(v) for n, i in self.field_at},
        }  # fmt: skip


class JobNormaliser(ABC):
    """A job's rows in, their outcomes out: what `NormalisingPool` runs, here or in a worker."""

    @abstractmethod
    def __call__(self, rows: Sequence[Any]) -> list[Outcome]: ...

    def encoded(self, rows: Sequence[Any]) -> SentOutcomes:
        """The outcomes as they leave the worker: one JSON document (see `decoded_outcomes`)."""
        return encode_outcomes(self(rows))


@dataclass(frozen=True)
class ChunkNormaliser(JobNormaliser):
    """Normalises chunks of warehouse rows (the streamed first sync)."""

    payload: PayloadBuilder
    normalise: RowNormaliser

    def __call__(self, rows: Sequence[Sequence[Any]]) -> list[Outcome]:
        payload, outcome = self.payload, self.normalise.outcome
        return [outcome(payload(row)) for row in rows]


@dataclass(frozen=True)
class PayloadNormaliser(JobNormaliser):
    """Normalises staged payloads as the planner reads them back (their JSON texts)."""

    normalise: RowNormaliser

    def __call__(self, texts: Sequence[str]) -> list[Outcome]:
        outcome, loads = self.normalise.outcome, loads_text
        return [outcome(loads(text)) for text in texts]


def encode_outcomes(outcomes: list[Outcome]) -> SentOutcomes:
    """Outcomes as one orjson document: ~5x less work on both sides than pickling the tuples
    and their dicts. Values orjson refuses (integers beyond 64 bits) leave them as they are.
    NaN and infinite field values arrive as None, which is how every destination renders them
    (`json_value`); their fingerprints were taken before and stay those of the originals."""
    try:  # orjson writes tuples but not their subclasses (Ready)
        return orjson.dumps([o if o.__class__ is str else tuple(o) for o in outcomes])
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return outcomes


def decoded_outcomes(sent: SentOutcomes) -> list[Outcome]:
    """What `encode_outcomes` sent, as outcomes again."""
    if not isinstance(sent, bytes):
        return sent
    return [
        entry if entry.__class__ is str else Ready(
            entry[0], entry[1], tuple(entry[2]) if entry[2] else (), *entry[3:]
        )
        for entry in orjson.loads(sent)
    ]  # fmt: skip


def _json_value(value: Any) -> Any:
    """`destinations.base.json_value`, imported on first use: the worker process then loads
    the HTTP and pydantic stack only for warehouse types JSON lacks (dates, decimals...)."""
    from destinations.base import json_value

    return json_value(value)


class NormalisingPool:
    """Normalises chunks in one more process (`parallel`) or in this one, as they are handed in.

    `submit` returns a future either way; the caller keeps a few chunks in flight and takes the
    results in order. The worker exits when this process goes away, even by `kill -9`.

    With `share_when_behind`, a chunk handed in while that many are still waiting for the
    worker is normalised here instead: the worker is behind, and this process would otherwise
    only wait for it.
    """

    def __init__(
        self, normalise: JobNormaliser, *, parallel: bool, share_when_behind: int | None = None
    ) -> None:
        self.normalise = normalise
        self.share_when_behind = share_when_behind
        self._waiting: deque[Future[SentOutcomes]] = deque()
        self._executor: ProcessPoolExecutor | None = None
        self._started = False
        if parallel:
            try:
                self._executor = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_exit_with_parent,
                    initargs=(os.getpid(),),
                )
            except OSError as error:  # e.g. no POSIX semaphores in this container
                self._in_this_process(error)

    @property
    def parallel(self) -> bool:
        return self._executor is not None

    def submit(self, rows: Sequence[Any]) -> Future[SentOutcomes]:
        if self._executor is not None and not self._behind():
            try:
                with contextlib.nullcontext() if self._started else _worker_starting():
                    future = self._executor.submit(self.normalise.encoded, rows)
                    self._started = True
                self._waiting.append(future)
                return future
            except BrokenProcessPool as error:
                raise _worker_stopped(error) from None
            except OSError as error:  # the worker could not be started
                self._executor.shutdown(wait=False)  # jobs already handed in still finish
                self._in_this_process(error)
        done: Future[SentOutcomes] = Future()
        done.set_result(self.normalise(rows))
        return done

    def _behind(self) -> bool:
        """Whether `share_when_behind` chunks are still waiting for the worker."""
        waiting = self._waiting
        while waiting and waiting[0].done():
            waiting.popleft()
        return self.share_when_behind is not None and len(waiting) >= self.share_when_behind

    def _in_this_process(self, error: OSError) -> None:
        log.warning(
            "cannot start a process to normalise identifiers (%s); normalising in this one",
            error,
        )
        self._executor = None

    def in_order(
        self, jobs: Iterable[tuple[Tag, Sequence[Any]]], *, ahead: int
    ) -> Iterator[tuple[Tag, list[Outcome]]]:
        """Each job's outcomes with its tag, in the order the jobs come; up to `ahead` more
        jobs are handed in while the oldest one's outcomes are used."""
        in_flight: deque[tuple[Tag, Future[SentOutcomes]]] = deque()
        for tag, rows in jobs:
            in_flight.append((tag, self.submit(rows)))
            if len(in_flight) > ahead:
                oldest, future = in_flight.popleft()
                yield oldest, self.outcomes(future)
        while in_flight:
            oldest, future = in_flight.popleft()
            yield oldest, self.outcomes(future)

    @staticmethod
    def outcomes(future: Future[SentOutcomes]) -> list[Outcome]:
        """A submitted chunk's outcomes, in the order of its rows (waits for them)."""
        try:
            return decoded_outcomes(future.result())
        except BrokenProcessPool as error:
            raise _worker_stopped(error) from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> NormalisingPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@contextlib.contextmanager
def _worker_starting() -> Iterator[None]:
    """Around the job that starts the worker (and the executor's thread): Ctrl-C and SIGTERM
    wait until both are started, and the worker starts with them blocked.

    Both signals reach the worker too (a terminal sends Ctrl-C to the whole foreground
    process group, a scheduler SIGTERM to a process group or cgroup), but winback handles them
    and closes the pool, which stops the worker. A new process inherits the signal mask of
    the thread that starts it (the executor starts it in `submit`), so they stay blocked
    until `_exit_with_parent` ignores them: they cannot cut the worker's start short (a
    KeyboardInterrupt traceback from `import phonenumbers`, or "Fatal Python error:
    init_import_site" in Python's own start). multiprocessing starts its resource tracker
    the same way. Here, a stop raised in the middle of `submit` would leave the executor a
    thread it cannot join when the pool is closed (an unexpected RuntimeError, not exit 130)."""
    with interrupts_held():
        if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
            yield
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker_stopped(error: BrokenProcessPool) -> WinbackError:
    return WinbackError(
        f"the process normalising identifiers stopped unexpectedly ({error}); what was "
        "acknowledged so far is recorded, run the sync again to send the rest"
    )


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: exit as soon as the process that started this one is gone (POSIX:
    an orphan is handed to another parent; elsewhere the worker exits when winback closes the
    pool, as after any run that is not killed).

    Ctrl-C, and the SIGTERM a scheduler sends to a whole process group or cgroup, reach this
    process too: winback handles them and closes the pool, so the worker ignores both (blocked
    since it started, `_worker_starting`: one that came meanwhile is dropped). Dying from one
    while writing a result would leave half a message in the pipe, on which Python
    3.11's executor waits forever when the pool is closed. The cycle collector is tuned as in
    winback itself."""
    for signum in STOPPING_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING_SIGNALS)
    tune_garbage_collector()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="winback-parent-watch", daemon=True).start()
