"""Loads `winback.toml`: TOML → `${ENV}` interpolation → pydantic models → cross-checks.

Validation is two-phase, as for plugins everywhere: the core models read each destination's
`type` and keep its table raw; the chosen adapter's own options model then validates that table.
Every problem is collected and reported at once, each with the file and its TOML path.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from connector.errors import ConfigError, ConfigProblem
from connector.rules import RulesSegment
from connector.warehouse import parse_database_url
from destinations.base import (
    IDENTIFIER_NAMES,
    Destination,
    DestinationOptions,
    Redactor,
    RetrySettings,
    redact_query_values,
)
from destinations.registry import Registry, load_registry

DEFAULT_CONFIG = "winback.toml"
CONFIG_ENV = "WINBACK_CONFIG"
ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
NAMED_TABLES = ("segments", "destinations", "syncs")
"""Sections holding one table per name."""
UNKNOWN_KEY = "unknown key; check its spelling against config.example.toml"
PATH_OPTION_NAMES = ("path", "credentials_file")
"""Destination options holding file paths; relative ones resolve against the config folder."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WarehouseConfig(StrictModel):
    url: str = Field("duckdb:///warehouse.duckdb", description="SQLAlchemy URL of the warehouse.")
    chunk_size: int = Field(10_000, ge=100, le=1_000_000, description="Rows fetched per chunk.")
    pushdown: bool = Field(
        True,
        description="Compare the segment with the last sync inside the warehouse when it can "
        "(DuckDB, PostgreSQL), so unchanged rows never leave it; false: always in the state "
        "database.",
    )


class StateConfig(StrictModel):
    url: str = Field(
        "sqlite:///.winback/state.db", description="SQLAlchemy URL of the state store."
    )
    keep_runs: int = Field(100, ge=1, description="Runs kept in history per sync (older pruned).")
    keep_issue_runs: int = Field(
        10,
        ge=1,
        description="Newest runs per sync whose row issues are kept (`sync issues`); older "
        "runs keep only their counts. At most keep_runs: a larger value acts as keep_runs.",
    )

    @field_validator("url")
    @classmethod
    def _kept_between_runs(cls, value: str) -> str:
        try:
            parsed = parse_database_url(value)
        except ValueError:
            return value  # the state store says what is wrong with it when it opens
        if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise ValueError(
                "an in-memory SQLite database forgets every snapshot when winback exits: each "
                "run would send everyone again and never remove anyone; name a file, e.g. "
                "sqlite:///.winback/state.db"
            )
        return value

    @model_validator(mode="after")
    def _issues_within_history(self) -> StateConfig:
        # A run pruned from history loses its row issues too, so more cannot be kept.
        self.keep_issue_runs = min(self.keep_issue_runs, self.keep_runs)
        return self


class QuerySegment(StrictModel):
    """A segment defined by SQL, inline (`sql`) or in a file (`file`)."""

    key: str = Field(description="Column that identifies a person (unique per row).")
    sql: str | None = None
    file: Path | None = None
    as_of: dt.date | None = Field(None, description="Value of `:as_of` in the SQL (default today).")
    description: str | None = None

    @field_validator("sql")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; write a SELECT returning the key column")
        return value


Segment = QuerySegment | RulesSegment

SyncMode = Literal["mirror", "add_only", "upsert"]


def mapped_options(identifiers: Mapping[str, str], fields: Mapping[str, str]) -> dict[str, str]:
    """Option path under a sync (``identifiers.email``, ``fields.FNAME``) → the segment column
    it reads (how errors name a mapped column)."""
    return {
        **{f"identifiers.{name}": column for name, column in identifiers.items()},
        **{f"fields.{name}": column for name, column in fields.items()},
    }


class SyncConfig(StrictModel):
    segment: str
    destination: str
    audience: str | None = None
    mode: SyncMode = "mirror"
    identifiers: dict[str, str] = Field(default_factory=dict)
    fields: dict[str, str] = Field(default_factory=dict)
    max_removal_pct: float = Field(50.0, ge=0, le=100)
    default_country: str | None = Field(
        None, description="Region for phone numbers without a country code (ISO alpha-2)."
    )
    batch_size: int | None = Field(None, ge=1, description="Override the destination's batch size.")
    options: dict[str, Any] = Field(default_factory=dict)

    def mapped_options(self) -> dict[str, str]:
        """Option path under the sync (``identifiers.email``) → the segment column it reads."""
        return mapped_options(self.identifiers, self.fields)

    @field_validator("identifiers")
    @classmethod
    def _known_identifiers(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(IDENTIFIER_NAMES))
        if unknown:
            raise ValueError(
                f"unknown identifier {', '.join(f'`{u}`' for u in unknown)}; "
                f"use one of {', '.join(IDENTIFIER_NAMES)}"
            )
        return value

    @field_validator("default_country")
    @classmethod
    def _country_code(cls, value: str | None) -> str | None:
        if value is None:
            return value
        problem = f"`{value}` is not an ISO 3166 alpha-2 code such as `US` or `FR`"
        if not re.fullmatch(r"[A-Za-z]{2}", value):
            raise ValueError(problem)
        from connector.identity import InvalidIdentifier, normalise_country  # loads phonenumbers

        try:
            return normalise_country(value)  # `UK` is GB; unassigned codes (`XX`) are refused
        except InvalidIdentifier:
            raise ValueError(f"{problem} (it is not an assigned country code)") from None


class RawConfig(StrictModel):
    """The file as written; destinations are still raw tables here."""

    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    segments: dict[str, dict[str, Any]] = Field(default_factory=dict)
    destinations: dict[str, dict[str, Any]] = Field(default_factory=dict)
    syncs: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class DestinationConfig:
    name: str
    adapter: type[Destination]
    options: DestinationOptions


@dataclass(frozen=True)
class WinbackConfig:
    """A fully validated configuration."""

    path: Path
    warehouse: WarehouseConfig
    state: StateConfig
    retry: RetrySettings
    segments: dict[str, Segment]
    destinations: dict[str, DestinationConfig]
    syncs: dict[str, SyncConfig]
    sync_options: dict[str, BaseModel]

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def resolve_config_path(path: Path | None) -> Path:
    """`--config`, else `$WINBACK_CONFIG`, else ./winback.toml."""
    if path is not None:
        return path
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _pydantic_problems(prefix: str, error: ValidationError) -> list[ConfigProblem]:
    problems = []
    for item in error.errors():
        location = _format_location((*prefix.split("."), *item["loc"]) if prefix else item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = UNKNOWN_KEY
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(ConfigProblem(location, message))
    return problems


def interpolate_env(
    value: Any,
    location: str,
    problems: list[ConfigProblem],
    *,
    used: list[Interpolated] | None = None,
) -> Any:
    """Replace `${VAR}` (or `${VAR:-default}`) in every string; unset variables are problems.

    Every `${` must start such a reference: an unclosed one or one without a valid name is a
    problem too, rather than text passed on as it is. Each value put in is added to `used`."""
    if isinstance(value, str):
        return _interpolate_text(value, location, problems, used)
    if isinstance(value, dict):
        return {
            k: interpolate_env(v, f"{location}.{k}" if location else k, problems, used=used)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate_env(v, f"{location}[{i}]", problems, used=used) for i, v in enumerate(value)
        ]
    return value


@dataclass(frozen=True)
class Interpolated:
    """A value from the environment (or a `${VAR:-default}`) put into the string at
    `location` of the config, which reads `text` once interpolated."""

    location: str
    value: str
    text: str


_REFERENCE_HINT = "write `${NAME}` or `${NAME:-default}`"


def _interpolate_text(
    text: str,
    location: str,
    problems: list[ConfigProblem],
    used: list[Interpolated] | None = None,
) -> str:
    parts: list[str] = []
    values: list[str] = []
    position = 0
    while (start := text.find("${", position)) >= 0:
        parts.append(text[position:start])
        match = ENV_PATTERN.match(text, start)
        if match is not None and "${" in (match.group(2) or ""):
            problems.append(
                ConfigProblem(
                    location,
                    f"`{_excerpt(text[start:])}`: a default cannot hold another `${{...}}` "
                    f"(defaults are plain text); {_REFERENCE_HINT}",
                )
            )
            position = len(text)
            continue
        if match is not None:
            values.append(_env_value(match, location, problems))
            parts.append(values[-1])
            position = match.end()
            continue
        end = text.find("}", start)
        if end < 0:
            reference = _excerpt(text[start:])
            message = f"`{reference}` has no closing `}}`; {_REFERENCE_HINT}"
            position = len(text)
        else:
            reference = _excerpt(text[start : end + 1])
            name = "empty" if end == start + 2 else "not a valid environment variable reference"
            message = (
                f"`{reference}` is {name}; {_REFERENCE_HINT} (NAME: letters, digits and `_`, "
                "not starting with a digit)"
            )
            position = end + 1
        problems.append(ConfigProblem(location, message))
    parts.append(text[position:])
    result = "".join(parts)
    if used is not None:
        used.extend(Interpolated(location, value, result) for value in values if value)
    return result


def _excerpt(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _env_value(match: re.Match[str], location: str, problems: list[ConfigProblem]) -> str:
    name, default = match.group(1), match.group(2)
    found = os.environ.get(name)
    if found is None or (found == "" and default is not None):
        if default is not None:
            return default
        problems.append(
            ConfigProblem(
                location,
                f"environment variable `{name}` is not set; export it before running "
                f"winback (or write `${{{name}:-default}}`)",
            )
        )
        return ""
    return found


def resolve_database_url(url: str, base_dir: Path) -> str:
    """Make a relative SQLite/DuckDB file path absolute against the config folder; a URL that
    does not parse is a ValueError quoting no part of its password."""
    parsed = parse_database_url(url)
    database = parsed.database
    if parsed.get_backend_name() in ("sqlite", "duckdb") and database and database != ":memory:":
        path = Path(database).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        return parsed.set(database=str(path)).render_as_string(hide_password=False)
    return url


def load_config(path: Path, *, registry: Registry | None = None) -> WinbackConfig:
    """Read, interpolate and validate a config file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file `{path}` not found; create one with `winback init` or pass --config"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read `{path}`: {error.strerror}", source=source) from None
    try:
        text = data.decode("utf-8-sig")  # a byte order mark some editors write is not TOML
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"not UTF-8 text: byte 0x{data[error.start]:02x} at line {line} (byte offset "
            f"{error.start}) is not valid UTF-8; save the file as UTF-8 in your editor",
            source=source,
        ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"not valid TOML: {error}", source=source) from None
    return build_config(document, path=path.resolve(), registry=registry)


def build_config(
    document: Mapping[str, Any], *, path: Path, registry: Registry | None = None
) -> WinbackConfig:
    """Validate a parsed TOML document (see `load_config`).

    Each stage (interpolation, the models, the cross-checks) goes on with whatever the stage
    before could make of the document, so one run reports every problem it can know of; what is
    already reported (an unset variable, a wrong value, an invalid segment) is not reported again
    as invalid or undefined by a later stage."""
    source = str(path)
    problems: list[ConfigProblem] = []
    interpolated: list[Interpolated] = []
    document = interpolate_env(dict(document), "", problems, used=interpolated)
    # What stands in for a value that could not be interpolated (empty text) may upset other
    # checks of its table: there, only unknown keys are reported besides it.
    uninterpolated = {_table_of(problem.location) for problem in problems}
    found: list[ConfigProblem] = []
    raw, _ = _validate_leniently(RawConfig, document, "", found)
    if raw is None:  # pragma: no cover - every top-level key has a default
        raw = RawConfig()

    base_dir = path.parent
    warehouse, state = raw.warehouse, raw.state
    for section, model in (("warehouse", warehouse), ("state", state)):
        try:
            model.url = resolve_database_url(model.url, base_dir)
        except ValueError as error:
            found.append(ConfigProblem(f"{section}.url", str(error)))

    segments = _build_segments(raw.segments, base_dir, found)
    registry = registry or load_registry()
    # Before anything can fail: a message about a URL or an option may quote these values.
    Redactor(_secret_values(interpolated, raw.destinations, registry))
    destinations = _build_destinations(raw.destinations, registry, base_dir, found)
    invalid = (
        _unusable_names(document, "segments", segments),
        _unusable_names(document, "destinations", destinations),
    )
    syncs, sync_options = _build_syncs(raw.syncs, segments, destinations, found, invalid=invalid)
    _check_shared_targets(syncs, destinations, found)
    _check_shared_audiences(syncs, destinations, found)
    problems.extend(
        p for p in found if _table_of(p.location) not in uninterpolated or p.message == UNKNOWN_KEY
    )
    if problems:
        raise ConfigError(problems, source=source)
    return WinbackConfig(
        path=path,
        warehouse=warehouse,
        state=state,
        retry=raw.retry,
        segments=segments,
        destinations=destinations,
        syncs=syncs,
        sync_options=sync_options,
    )


MIN_URL_SECRET = 8
"""Characters from which an environment value in a URL's path or query is redacted as a secret
(shorter ones, such as a region `eu`, would redact ordinary words of messages)."""


def _secret_values(
    interpolated: Iterable[Interpolated],
    destinations: Mapping[str, Mapping[str, Any]],
    registry: Registry,
) -> list[str]:
    """The values from the environment that are secrets: those landing in a secret option of a
    destination (`SecretStr`), in the password of a URL or in the value of a URL query parameter
    named like a credential (`?password=`, `?token=`...), and those of 8 characters or more in a
    URL's path or query (`/hooks/${HOOK_TOKEN}/`: a value kept out of the file is a secret)."""
    secrets = []
    for item in interpolated:
        if "://" in item.text:
            try:
                parts = urlsplit(item.text)
                password = parts.password or ""
                after_host = f"{parts.path}?{parts.query}"
            except ValueError:  # not a URL after all (a port that is not a number...)
                password = after_host = item.text
            in_password = bool(password) and (item.value in password or password in item.value)
            in_path = len(item.value) >= MIN_URL_SECRET and item.value in after_host
            if in_password or in_path or item.value not in redact_query_values(item.text):
                secrets += [item.value, password]
        elif _is_secret_option(item.location, destinations, registry):
            secrets.append(item.value)
    return secrets


def _is_secret_option(
    location: str, destinations: Mapping[str, Mapping[str, Any]], registry: Registry
) -> bool:
    """Whether `location` is a destination option its adapter declares as a `SecretStr`."""
    section, _, rest = location.partition(".")
    name, _, option = rest.partition(".")
    table = destinations.get(name) if section == "destinations" else None
    if not isinstance(table, Mapping) or not option or "." in option or "[" in option:
        return False
    kind = table.get("type")
    adapter = registry.get(kind) if isinstance(kind, str) else None
    field = adapter.options_model.model_fields.get(option) if adapter is not None else None
    return field is not None and _mentions(field.annotation, SecretStr)


def _mentions(annotation: Any, wanted: type) -> bool:
    """Whether a type annotation is `wanted` or holds it (`SecretStr | None`)."""
    return annotation is wanted or any(_mentions(arg, wanted) for arg in get_args(annotation))


Model = TypeVar("Model", bound=BaseModel)


def _validate_leniently(
    model: type[Model], table: Mapping[str, Any], where: str, problems: list[ConfigProblem]
) -> tuple[Model | None, set[str]]:
    """Validate `table`, reporting every problem with `where` as prefix. When it fails, validate
    it again without the keys in error (their defaults take their place), then without the
    top-level keys still in error, so later stages can check the rest of it.

    Returns that model (None when the table is unusable) and the top-level keys in error."""
    try:
        return model.model_validate(table), set()
    except ValidationError as error:
        problems.extend(_pydantic_problems(where, error))
        errors = error.errors()
    wrong = {str(item["loc"][0]) for item in errors if item["loc"]}
    usable = copy.deepcopy(dict(table))
    for item in errors:
        _remove_key(usable, item["loc"])
    try:
        return model.model_validate(usable), wrong
    except ValidationError as error:
        still = {str(item["loc"][0]) for item in error.errors() if item["loc"]}
    try:
        return model.model_validate({k: v for k, v in usable.items() if k not in still}), wrong
    except ValidationError:
        return None, wrong


def _remove_key(table: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    """Remove the key at pydantic location `loc` (the table holding a list, for an item)."""
    keys: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        keys.append(part)
    node: Any = table
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if keys and isinstance(node, dict):
        node.pop(keys[-1], None)


def _unusable_names(
    document: Mapping[str, Any], section: str, built: Mapping[str, object]
) -> set[str]:
    """Names of `section` that are in the file but invalid (already reported); when the section
    itself is not a table, every name the syncs refer to."""
    tables = document.get(section, {})
    if isinstance(tables, dict):
        return set(tables) - set(built)
    kind = section.removesuffix("s")
    syncs = document.get("syncs")
    return {
        str(table.get(kind))
        for table in (syncs.values() if isinstance(syncs, dict) else ())
        if isinstance(table, dict)
    }


def _table_of(location: str) -> str:
    """The table a TOML path is in: `syncs.s` for `syncs.s.identifiers.email`, `warehouse` for
    `warehouse.url`."""
    parts = location.split(".")
    return ".".join(parts[:2]) if parts[0] in NAMED_TABLES else parts[0]


def _overlaps(location: str, reported: set[str]) -> bool:
    """Whether `location` is one of `reported`, inside one, or a table holding one."""
    return any(_within(location, other) or _within(other, location) for other in reported if other)


def _within(location: str, table: str) -> bool:
    return location == table or location.startswith((f"{table}.", f"{table}["))


def _build_segments(
    tables: dict[str, dict[str, Any]], base_dir: Path, problems: list[ConfigProblem]
) -> dict[str, Segment]:
    segments: dict[str, Segment] = {}
    for name, table in tables.items():
        where = f"segments.{name}"
        try:
            segment: Segment
            if "from" in table or "signals" in table:
                segment = RulesSegment.model_validate(table)
            else:
                segment = QuerySegment.model_validate(table)
        except ValidationError as error:
            problems.extend(_pydantic_problems(where, error))
            continue
        if isinstance(segment, QuerySegment):
            if (segment.sql is None) == (segment.file is None):
                problems.append(
                    ConfigProblem(
                        where,
                        "needs exactly one of `sql`, `file` or `from` (a rules segment)",
                    )
                )
                continue
            if segment.file is not None:
                file = segment.file if segment.file.is_absolute() else base_dir / segment.file
                if not file.is_file():
                    problems.append(ConfigProblem(f"{where}.file", f"file `{file}` not found"))
                    continue
                segment = segment.model_copy(update={"file": file})
        segments[name] = segment
    return segments


def _build_destinations(
    tables: dict[str, dict[str, Any]],
    registry: Registry,
    base_dir: Path,
    problems: list[ConfigProblem],
) -> dict[str, DestinationConfig]:
    destinations: dict[str, DestinationConfig] = {}
    for name, table in tables.items():
        where = f"destinations.{name}"
        kind = table.get("type")
        if not isinstance(kind, str):
            problems.append(ConfigProblem(f"{where}.type", "required key is missing"))
            continue
        adapter = registry.get(kind)
        if adapter is None:
            hint = registry.broken.get(kind) or (
                f"installed adapters: {', '.join(sorted(registry.adapters)) or 'none'}"
            )
            problems.append(ConfigProblem(f"{where}.type", f"unknown destination `{kind}`; {hint}"))
            continue
        try:
            options = adapter.options_model.model_validate(table)
        except ValidationError as error:
            problems.extend(_pydantic_problems(where, error))
            continue
        options = _with_resolved_paths(options, base_dir)
        destinations[name] = DestinationConfig(name=name, adapter=adapter, options=options)
    return destinations


def _with_resolved_paths(options: DestinationOptions, base_dir: Path) -> DestinationOptions:
    """The destination's file path options, set or defaulted, with `~` expanded and relative
    ones resolved against the config folder (not the folder winback is run from)."""
    resolved = {}
    for option in PATH_OPTION_NAMES:
        value = getattr(options, option, None)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            resolved[option] = str(path if path.is_absolute() else base_dir / path)
    return options.model_copy(update=resolved) if resolved else options


MAX_SYNC_NAME_LENGTH = 200
"""The state store's column for sync names (PostgreSQL refuses longer ones)."""


def _build_syncs(
    tables: dict[str, dict[str, Any]],
    segments: dict[str, Segment],
    destinations: dict[str, DestinationConfig],
    problems: list[ConfigProblem],
    *,
    invalid: tuple[set[str], set[str]] = (set(), set()),
) -> tuple[dict[str, SyncConfig], dict[str, BaseModel]]:
    """Validate syncs; references to segments/destinations already reported are not repeated.

    A sync table with wrong values is still cross-checked (its references, what its destination
    requires) with what is left of it, except where its own problems are already reported."""
    syncs: dict[str, SyncConfig] = {}
    sync_options: dict[str, BaseModel] = {}
    for name, table in tables.items():
        where = f"syncs.{name}"
        own: list[ConfigProblem] = []
        if len(name) > MAX_SYNC_NAME_LENGTH:
            own.append(
                ConfigProblem(
                    where,
                    f"a sync name of {len(name)} characters is longer than "
                    f"{MAX_SYNC_NAME_LENGTH} (the state store keeps it); use a shorter name",
                )
            )
        sync, wrong = _validate_leniently(SyncConfig, table, where, own)
        problems.extend(own)
        if sync is None:
            continue
        checks: list[ConfigProblem] = []
        options = _check_sync(
            sync, where, segments, destinations, checks, invalid=invalid, wrong=wrong
        )
        reported = {problem.location for problem in own}
        problems.extend(p for p in checks if not _overlaps(p.location, reported))
        if own or checks or options is None:
            continue
        syncs[name] = sync
        sync_options[name] = options
    return syncs, sync_options


def _check_shared_targets(
    syncs: Mapping[str, SyncConfig],
    destinations: Mapping[str, DestinationConfig],
    problems: list[ConfigProblem],
) -> None:
    """Two syncs writing to a target only one may write (`Destination.exclusive_target`, e.g.
    a file runs append to): runs of both at the same time would mix their data."""
    first: dict[str, tuple[str, str]] = {}
    for name, sync in syncs.items():
        destination = destinations[sync.destination]
        exclusive = destination.adapter.exclusive_target(destination.options, sync=name)
        if exclusive is None:
            continue
        other, other_destination = first.setdefault(exclusive.target, (name, sync.destination))
        if other == name:
            continue
        via = (
            f"destination `{sync.destination}`"
            if other_destination == sync.destination
            else f"destinations `{other_destination}` and `{sync.destination}`"
        )
        problems.append(
            ConfigProblem(
                f"syncs.{name}.destination",
                f"syncs `{other}` and `{name}` both write to {exclusive.target} ({via}): "
                f"runs of both would mix their rows in it; {exclusive.hint}",
            )
        )


def _check_shared_audiences(
    syncs: Mapping[str, SyncConfig],
    destinations: Mapping[str, DestinationConfig],
    problems: list[ConfigProblem],
) -> None:
    """Two syncs sending to one audience of one destination, one of them in `mirror` mode:
    each removes only the members it added, so a person in both segments who leaves one
    would be removed from the audience while the other sync still counts them in it."""
    first: dict[tuple[str, str], str] = {}
    for name, sync in syncs.items():
        destination = destinations[sync.destination]
        if not destination.adapter.requires_audience or sync.audience is None:
            continue  # a webhook's audience is a label: its receiver tells the syncs apart
        other = first.setdefault((sync.destination, sync.audience), name)
        if other == name:
            continue
        remover = next(
            (n for n in (other, name) if syncs[n].mode == "mirror"),
            None,
        )
        if remover is None:
            continue  # neither removes anyone: two segments may feed one audience
        problems.append(
            ConfigProblem(
                f"syncs.{name}.audience",
                f"syncs `{other}` and `{name}` both send to audience `{sync.audience}` of "
                f"destination `{sync.destination}`, and `{remover}` removes members (mode = "
                '"mirror"): each sync removes only the members it added, so someone in both '
                "segments who leaves one would be taken out of the audience while the other "
                "sync still counts them in. Give each sync its own audience, make one segment "
                'of both, or set both to mode = "add_only" or "upsert"',
            )
        )


def _check_sync(
    sync: SyncConfig,
    where: str,
    segments: dict[str, Segment],
    destinations: dict[str, DestinationConfig],
    problems: list[ConfigProblem],
    *,
    invalid: tuple[set[str], set[str]],
    wrong: set[str],
) -> BaseModel | None:
    """Check a sync against its segment and destination; returns its validated options."""
    invalid_segments, invalid_destinations = invalid
    if sync.segment not in segments and sync.segment not in invalid_segments:
        problems.append(
            ConfigProblem(
                f"{where}.segment",
                f"segment `{sync.segment}` is not defined; defined: "
                f"{', '.join(sorted(segments)) or 'none'}",
            )
        )
    destination = destinations.get(sync.destination)
    if destination is None:
        if sync.destination not in invalid_destinations:
            problems.append(
                ConfigProblem(
                    f"{where}.destination",
                    f"destination `{sync.destination}` is not defined; defined: "
                    f"{', '.join(sorted(destinations)) or 'none'}",
                )
            )
        return None
    adapter = destination.adapter
    if adapter.requires_audience and not sync.audience:
        problems.append(
            ConfigProblem(
                f"{where}.audience",
                f"required by `{adapter.name}` destinations: the id of the target audience or list",
            )
        )
    if not sync.identifiers:
        problems.append(
            ConfigProblem(
                f"{where}.identifiers",
                'map at least one identifier, e.g. identifiers = { email = "email" }',
            )
        )
    refused = sorted(set(sync.identifiers) - adapter.accepted_identifiers)
    if refused:
        problems.append(
            ConfigProblem(
                f"{where}.identifiers",
                f"`{adapter.name}` does not accept {', '.join(refused)}; it accepts "
                f"{', '.join(sorted(adapter.accepted_identifiers))}",
            )
        )
    # With a wrong `mode` the default stands in for it: whether fields are allowed is unknown.
    mode_known = "mode" not in wrong
    if sync.fields and not adapter.supports_update and sync.mode != "add_only" and mode_known:
        problems.append(
            ConfigProblem(
                f"{where}.fields",
                f"`{adapter.name}` does not store attributes; remove `fields`",
            )
        )
    # What the adapter cannot carry (e.g. a CSV column name used twice).
    unusable = adapter.mapping_problems(
        destination.options, identifiers=tuple(sync.identifiers), fields=tuple(sync.fields)
    )
    problems.extend(ConfigProblem(f"{where}.{key}", message) for key, message in unusable)
    try:
        return adapter.sync_options_model.model_validate(sync.options)
    except ValidationError as error:
        problems.extend(_pydantic_problems(f"{where}.options", error))
        return None
