"""The contract kit itself, on a small token-authenticated list platform served by a local
HTTP server: the whole suite passes on a correct adapter, and its checks catch the mistakes
the audit of real adapters found.

The adapter's config example (the suite checks that its module shows one)::

    [destinations.lists]
    type = "lists"
    token = "${LISTS_TOKEN}"
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr

from destinations.base import (
    Acknowledged,
    Batch,
    BatchResult,
    HttpDestination,
    HttpDestinationOptions,
    json_body,
)
from destinations.testing.contract import ContractHarness, DestinationContract, contract_context
from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse

TOKEN = "list-token-0123456789"


class FakeLists:
    """A list platform: members by ref, ids it assigns, bearer-token auth."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.writes = 0
        self.server = FakeHttpServer(self.handle)

    def handle(self, request: RecordedRequest) -> ScriptedResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return ScriptedResponse(401, {"error": "invalid token"})
        if request.method == "GET":
            return ScriptedResponse(200, {"size": len(self.members)})
        self.writes += 1
        document = request.json()
        if request.path.endswith("/delete"):
            for ref in document["refs"]:
                self.members.pop(ref, None)
            return ScriptedResponse(200, {})
        for member in document["members"]:
            self.members[member["ref"]] = member
        return ScriptedResponse(
            200, {"ids": {m["ref"]: f"id-{m['ref']}" for m in document["members"]}}
        )


class ListOptions(HttpDestinationOptions):
    token: SecretStr


class ListDestination(HttpDestination):
    """Fake lists: members by the sync's key."""

    name = "lists"
    options_model = ListOptions
    supports_update = False
    default_base_url: ClassVar[str] = "https://lists.example.com"
    options: ListOptions

    def auth_headers(self) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {self.options.token.get_secret_value()}"}

    def check(self) -> str:
        size = json_body(self.http.request("GET", "lists/1"), destination=self.name)["size"]
        return f"list 1 reachable ({size} members)"

    def add(self, batch: Batch) -> BatchResult:
        if not batch.members:
            return BatchResult()
        members = [{"ref": m.key, **m.identifiers, "fields": dict(m.fields)} for m in batch.members]
        response = self.http.request("POST", "lists/1/members", json={"members": members})
        ids = json_body(response, destination=self.name)["ids"]
        return BatchResult([Acknowledged(m.key, ids.get(m.key)) for m in batch.members])

    def remove(self, batch: Batch) -> BatchResult:
        if not batch.members:
            return BatchResult()
        refs = [m.key for m in batch.members]
        self.http.request("POST", "lists/1/members/delete", json={"refs": refs})
        return BatchResult.all_acknowledged(batch)


class OrphaningListDestination(ListDestination):
    """The audit's mistake: removes by platform id only, and acknowledges the others anyway."""

    def remove(self, batch: Batch) -> BatchResult:
        known = [m.key for m in batch.members if m.platform_id is not None]
        if known:
            self.http.request("POST", "lists/1/members/delete", json={"refs": known})
        return BatchResult.all_acknowledged(batch)


def harness_for(fake: FakeLists, adapter: type[ListDestination]) -> ContractHarness:
    def build(token: str) -> Any:
        options = ListOptions(type="lists", token=token, base_url=fake.server.url)
        return lambda context: adapter(options, context)

    return ContractHarness(
        build=build(TOKEN),
        members=lambda: fake.members,
        calls=lambda: fake.writes,
        secrets=[TOKEN],
        build_with_bad_credentials=build("revoked-token-987654"),
        returns_platform_ids=True,
    )


class TestListContract(DestinationContract):
    @pytest.fixture
    def harness(self) -> Iterator[ContractHarness]:
        fake = FakeLists()
        with fake.server:
            yield harness_for(fake, ListDestination)


def test_fields_with_warehouse_types_reach_the_platform_as_json_values() -> None:
    fake = FakeLists()
    with fake.server:
        TestListContract().test_fields_with_warehouse_types_are_sent(
            harness_for(fake, ListDestination)
        )
    assert fake.members["k1"]["fields"] == {
        "first_name": "Name1",
        "lifetime_value": 1234.5,
        "last_order_on": "2026-11-02",
        "last_seen_at": "2026-11-02T08:30:00+00:00",
    }


def test_the_kit_catches_a_removal_acknowledged_without_removing() -> None:
    fake = FakeLists()
    with fake.server:
        harness = harness_for(fake, OrphaningListDestination)
        adapter = harness.build(contract_context(harness))
        with pytest.raises(AssertionError, match="the platform keeps it"):
            TestListContract().test_removing_a_member_without_its_platform_id(harness, adapter)


class IdlessListDestination(ListDestination):
    """Forgets the ids the platform answers: its removals would have nothing to go by."""

    def add(self, batch: Batch) -> BatchResult:
        super().add(batch)
        return BatchResult.all_acknowledged(batch)


def test_the_kit_catches_adds_acknowledged_without_their_platform_ids() -> None:
    fake = FakeLists()
    with fake.server:
        harness = harness_for(fake, IdlessListDestination)
        adapter = harness.build(contract_context(harness))
        with pytest.raises(AssertionError, match="without the platform's id"):
            TestListContract().test_adds_return_the_platform_ids_removals_need(harness, adapter)
