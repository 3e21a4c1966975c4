"""How a SQL segment's text is prepared before it is run or wrapped as a subquery."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from connector.segments import query_text


@pytest.mark.parametrize(
    ("written", "prepared"),
    [
        ("SELECT id FROM people", "SELECT id FROM people\n"),
        ("SELECT id FROM people;\n", "SELECT id FROM people\n"),
        ("SELECT id FROM people -- the lapsed ones", "SELECT id FROM people -- the lapsed ones\n"),
        (
            "SELECT id FROM people\n-- the lapsed ones\n",
            "SELECT id FROM people\n-- the lapsed ones\n",
        ),
        ("SELECT id FROM people;\n-- end of query\n-- really", "SELECT id FROM people\n"),
        ("SELECT '--x' AS id", "SELECT '--x' AS id\n"),
    ],
)
def test_text_ends_so_that_it_can_be_wrapped(written: str, prepared: str) -> None:
    assert query_text(written) == prepared


@pytest.mark.parametrize(
    ("written", "prepared"),
    [
        (":as_of::date", "CAST(:as_of AS date)"),
        (":as_of::DATE - 30", "CAST(:as_of AS DATE) - 30"),
        (":as_of::timestamp with time zone", "CAST(:as_of AS timestamp with time zone)"),
        (":as_of::varchar(10)", "CAST(:as_of AS varchar(10))"),
        ("ordered_at::date > :as_of", "ordered_at::date > :as_of"),
    ],
)
def test_as_of_with_a_postgres_cast_stays_a_parameter(written: str, prepared: str) -> None:
    text = query_text(f"SELECT 1 WHERE {written}")
    assert text == f"SELECT 1 WHERE {prepared}\n"
    assert "as_of" in sa.text(text)._bindparams
