"""The adapter contract suite: behaviour every destination must show, whatever its platform.

An adapter's tests plug in by subclassing ``DestinationContract`` and providing a ``harness``
fixture: a factory that builds the adapter pointing at a fake of its platform, and hooks that read
what the fake recorded. Hooks the fake cannot provide stay ``None`` and their tests are skipped::

    class TestKlaviyoContract(DestinationContract):
        @pytest.fixture
        def harness(self) -> Iterator[ContractHarness]:
            with FakeKlaviyo() as fake:
                yield ContractHarness(
                    build=lambda context: KlaviyoDestination(
                        KlaviyoOptions(type="klaviyo", api_key=KEY, base_url=fake.url), context
                    ),
                    members=lambda: fake.list_members("list-1"),
                    calls=lambda: len(fake.requests),
                    secrets=[KEY],
                    fail_next=lambda n: fake.fail_next(*[503] * n),
                    reject_keys=fake.reject_keys,
                    fail_with=lambda status, body: fake.fail_next(status, body=body),
                )

The rules it checks:

- an empty batch returns an empty ``BatchResult`` and makes no call (the engine never sends one,
  but an adapter must not crash or talk to the platform for nothing);
- every member of a batch is acknowledged or rejected, never both, never a stranger key;
- re-adding and retrying are idempotent: membership holds each key once, and every attempt of one
  batch carries the same idempotency key (``delivery_ids``);
- rejections name the right keys, with a reason, and the other rows still land;
- removal removes exactly the given members (using the ``platform_id`` returned by ``add``,
  which a platform that keeps ids of its own must return: ``returns_platform_ids``), and
  removing someone already gone is not an error;
- a member without a ``platform_id`` (added by a run whose answer was lost) is removed too, or
  left rejected or unconfirmed: never acknowledged while the platform keeps it;
- fields holding warehouse values (``Decimal``, dates, timestamps) are sent, not a TypeError;
- ``check()`` with credentials the platform refuses stops the sync (``FatalDestinationError``)
  without showing them;
- secrets never appear in ``repr``, in options dumps, in ``check()`` output or in error messages;
- ``check()`` answers one line without changing the audience; ``close()`` may be called twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from connector.errors import DestinationError, FatalDestinationError, TransientError
from destinations.base import (
    Batch,
    BatchResult,
    Destination,
    DestinationOptions,
    Member,
    NoSyncOptions,
    RetrySettings,
    SyncContext,
)

T = TypeVar("T")


def default_member(index: int) -> Member:
    """A member with an email and a first name, the identifiers every platform accepts."""
    return Member(
        key=f"k{index}",
        identifiers={"email": f"user{index}@example.com"},
        fields={"first_name": f"Name{index}"},
    )


@dataclass
class ContractHarness:
    """How the suite builds an adapter and observes its fake platform."""

    build: Callable[[SyncContext], Destination]
    """Build the adapter for this context, pointing at the fake."""
    members: Callable[[], Mapping[str, Any]]
    """The audience as the fake holds it now: key -> whatever the fake stores."""
    calls: Callable[[], int]
    """Requests (or writes) the fake has received so far."""
    secrets: Sequence[str] = ()
    """Values that must never appear in reprs, descriptions or errors."""
    fail_next: Callable[[int], None] | None = None
    """Make the next n calls fail transiently (503 or the platform's throttle answer)."""
    reject_keys: Callable[[set[str]], None] | None = None
    """Make the fake refuse these keys row by row."""
    fail_with: Callable[[int, str], None] | None = None
    """Answer the next call with this HTTP status and body."""
    delivery_ids: Callable[[], list[str | None]] | None = None
    """The idempotency key of every call received, in order, when the platform has one."""
    build_with_bad_credentials: Callable[[SyncContext], Destination] | None = None
    """Build the adapter with credentials the fake refuses (a wrong key or token)."""
    typed_fields: Mapping[str, Any] = field(default_factory=lambda: dict(TYPED_FIELDS))
    """Fields with warehouse types added to a member (empty: the platform stores none)."""
    make_member: Callable[[int], Member] = default_member
    returns_platform_ids: bool = False
    """The platform gives each added member an id of its own, which removals need (Klaviyo,
    HubSpot, SendGrid): every acknowledged add must carry it."""
    audience: str | None = "contract-audience"
    identifier_names: tuple[str, ...] = ("email",)
    field_names: tuple[str, ...] = ("first_name",)
    sync_options: BaseModel = field(default_factory=NoSyncOptions)


TYPED_FIELDS: Mapping[str, Any] = {
    "lifetime_value": Decimal("1234.50"),
    "last_order_on": datetime.date(2026, 11, 2),
    "last_seen_at": datetime.datetime(2026, 11, 2, 8, 30, tzinfo=datetime.UTC),
}
"""Values as the warehouse drivers return them, which the standard `json` cannot write."""


def contract_context(harness: ContractHarness, *, run_id: str = "run-0001") -> SyncContext:
    """A sync context for contract tests: 3 attempts, and no real waiting. A fake platform
    may throttle as the real one does (`Retry-After` up to an hour): the wait is asked for,
    and skipped."""
    return SyncContext(
        sync="contract_sync",
        run_id=run_id,
        audience=harness.audience,
        options=harness.sync_options,
        retry=RetrySettings(max_attempts=3, initial_backoff_s=0, max_backoff_s=3600, timeout_s=5),
        identifier_names=harness.identifier_names,
        field_names=harness.field_names,
        sleep=_no_wait,
    )


def _no_wait(seconds: float) -> None:
    """Contract tests do not wait for retries."""


def _batch(harness: ContractHarness, number: int, indexes: Sequence[int]) -> Batch:
    return Batch(number, [harness.make_member(i) for i in indexes])


def _keys(result: BatchResult) -> tuple[set[str], set[str]]:
    return {a.key for a in result.acknowledged}, {r.key for r in result.rejected}


def _hook(hook: T | None, what: str) -> T:
    """The hook, or skip the test when the fake platform does not provide it."""
    if hook is None:
        pytest.skip(f"the fake platform cannot {what}")
    return hook


class DestinationContract:
    """Subclass as ``Test<Platform>Contract`` and override the ``harness`` fixture."""

    @pytest.fixture
    def harness(self) -> ContractHarness:
        """Overridden by each adapter's test class; reaching this one is a mistake in the test."""
        pytest.fail(
            f"{type(self).__name__} must define a `harness` fixture returning a ContractHarness"
        )

    @pytest.fixture
    def adapter(self, harness: ContractHarness) -> Iterator[Destination]:
        destination = harness.build(contract_context(harness))
        yield destination
        destination.close()

    def test_declares_its_contract(self, adapter: Destination) -> None:
        cls = type(adapter)
        assert cls.name and cls.name == cls.name.lower()
        assert issubclass(cls.options_model, DestinationOptions)
        assert adapter.batch_size >= 1
        # The module docstring carries a config example naming the adapter.
        assert f'type = "{cls.name}"' in (sys.modules[cls.__module__].__doc__ or "")

    def test_empty_batch_makes_no_call(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        calls = [adapter.add, adapter.remove] + (
            [adapter.update] if adapter.supports_update else []
        )
        for call in calls:
            assert call(Batch(1, [])) == BatchResult()
        assert harness.calls() == 0
        assert dict(harness.members()) == {}

    def test_add_acknowledges_every_member(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        result = adapter.add(_batch(harness, 1, [1, 2, 3]))
        assert _keys(result) == ({"k1", "k2", "k3"}, set())
        assert set(harness.members()) == {"k1", "k2", "k3"}

    def test_adds_return_the_platform_ids_removals_need(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        if not harness.returns_platform_ids:
            pytest.skip("the platform keeps no ids of its own")
        result = adapter.add(_batch(harness, 1, [1, 2, 3]))
        missing = sorted(a.key for a in result.acknowledged if not a.platform_id)
        assert not missing, f"acknowledged without the platform's id: {missing}"
        assert len({a.platform_id for a in result.acknowledged}) == 3

    def test_readding_is_idempotent(self, harness: ContractHarness, adapter: Destination) -> None:
        adapter.add(_batch(harness, 1, [1, 2]))
        result = adapter.add(_batch(harness, 2, [1, 2]))
        assert _keys(result) == ({"k1", "k2"}, set())
        assert set(harness.members()) == {"k1", "k2"}

    def test_retried_batch_is_idempotent(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        _hook(harness.fail_next, "inject transient failures")(1)
        result = adapter.add(_batch(harness, 7, [1, 2]))
        assert _keys(result) == ({"k1", "k2"}, set())
        assert adapter.retries == 1
        assert harness.calls() == 2
        assert set(harness.members()) == {"k1", "k2"}
        if harness.delivery_ids is not None:
            ids = harness.delivery_ids()
            assert len(ids) == 2 and ids[0] is not None and ids[0] == ids[1]

    def test_transient_failures_end_in_a_transient_error(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        _hook(harness.fail_next, "inject transient failures")(10)
        with pytest.raises(TransientError):
            adapter.add(_batch(harness, 1, [1]))
        assert harness.calls() == 3  # contract_context allows 3 attempts
        assert dict(harness.members()) == {}

    def test_removal_removes_exactly_those_members(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        added = adapter.add(_batch(harness, 1, [1, 2, 3]))
        platform_ids = {a.key: a.platform_id for a in added.acknowledged}
        gone = harness.make_member(2)._replace(platform_id=platform_ids["k2"])
        result = adapter.remove(Batch(2, [gone]))
        assert _keys(result) == ({"k2"}, set())
        assert set(harness.members()) == {"k1", "k3"}

    def test_removing_an_absent_member_is_not_an_error(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        adapter.add(_batch(harness, 1, [1]))
        result = adapter.remove(_batch(harness, 2, [9]))
        assert not result.rejected
        assert set(harness.members()) == {"k1"}

    def test_removing_a_member_without_its_platform_id(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        """A member whose add was sent but never answered is settled without a platform id:
        removing it must remove it, or say it did not (rejected or unconfirmed); acknowledged
        while the platform keeps it, it would stay in the audience for good."""
        adapter.add(_batch(harness, 1, [1, 2]))
        unknown = harness.make_member(2)._replace(platform_id=None)
        result = adapter.remove(Batch(2, [unknown]))
        acknowledged, rejected = _keys(result)
        assert acknowledged | rejected | set(result.unconfirmed) == {"k2"}
        members = set(harness.members())
        if "k2" in acknowledged:
            assert "k2" not in members, "acknowledged as removed, but the platform keeps it"
        assert "k1" in members

    def test_fields_with_warehouse_types_are_sent(self, harness: ContractHarness) -> None:
        if not harness.typed_fields:
            pytest.skip("the platform stores no fields")
        context = contract_context(harness)
        names = (*context.field_names, *harness.typed_fields)
        destination = harness.build(dataclasses.replace(context, field_names=names))
        try:
            member = harness.make_member(1)
            typed = member._replace(fields={**member.fields, **harness.typed_fields})
            result = destination.add(Batch(1, [typed]))
        finally:
            destination.close()
        assert _keys(result) == ({"k1"}, set())
        assert set(harness.members()) == {"k1"}

    def test_check_with_refused_credentials_stops_the_sync(self, harness: ContractHarness) -> None:
        build = _hook(harness.build_with_bad_credentials, "refuse credentials")
        destination = build(contract_context(harness))
        try:
            with pytest.raises(FatalDestinationError) as refused:
                destination.check()
        finally:
            destination.close()
        assert not isinstance(refused.value, TransientError)
        for secret in harness.secrets:
            assert secret not in str(refused.value)
        assert dict(harness.members()) == {}

    def test_update_keeps_membership(self, harness: ContractHarness, adapter: Destination) -> None:
        if not adapter.supports_update:
            pytest.skip("the adapter does not store attributes")
        adapter.add(_batch(harness, 1, [1, 2]))
        changed = Member("k1", harness.make_member(1).identifiers, {"first_name": "Renamed"})
        result = adapter.update(Batch(2, [changed]))
        assert _keys(result) == ({"k1"}, set())
        assert set(harness.members()) == {"k1", "k2"}

    def test_rejections_are_attributed_to_their_keys(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        _hook(harness.reject_keys, "reject single rows")({"k2", "k-not-in-batch"})
        result = adapter.add(_batch(harness, 1, [1, 2, 3]))
        assert _keys(result) == ({"k1", "k3"}, {"k2"})
        assert all(rejection.reason.strip() for rejection in result.rejected)
        assert set(harness.members()) == {"k1", "k3"}

    def test_secrets_never_appear_in_reprs(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        shown = [repr(adapter), str(adapter), repr(adapter.options), str(adapter.options)]
        shown += [adapter.options.model_dump_json(), repr(adapter.options.model_dump())]
        for secret in harness.secrets:
            assert not any(secret in text for text in shown)

    @pytest.mark.parametrize(
        ("status", "error"), [(401, FatalDestinationError), (400, DestinationError)]
    )
    def test_secrets_never_appear_in_errors(
        self, harness: ContractHarness, adapter: Destination, status: int, error: type[Exception]
    ) -> None:
        _hook(harness.fail_with, "answer with a chosen status")(
            status, "refused: " + " ".join(harness.secrets)
        )
        with pytest.raises(error) as caught:
            adapter.add(_batch(harness, 1, [1]))
        assert not isinstance(caught.value, TransientError)
        for secret in harness.secrets:
            assert secret not in str(caught.value)

    def test_check_describes_the_target_without_changing_it(
        self, harness: ContractHarness, adapter: Destination
    ) -> None:
        description = adapter.check()
        assert description.strip() and "\n" not in description
        assert not any(secret in description for secret in harness.secrets)
        assert dict(harness.members()) == {}

    def test_close_twice_is_harmless(self, adapter: Destination) -> None:
        adapter.close()
        adapter.close()
