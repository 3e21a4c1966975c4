"""Identifier normalisation: one canonical form per identifier before diffing, hashing or sending.

The sync engine runs every segment row through ``normalise_identifiers`` (DESIGN.md, "Flow of one
sync", step 4); platform adapters then apply their own last-mile rules (``meta_phone``,
``google_email``, ``hashed_name``, ...) and hash with ``sha256_hex``. Canonical forms:

===============  ====================================================================
email            trimmed, lowercased, syntax-checked by ``email_validator`` (no DNS)
phone            E.164 with ``+`` via ``phonenumbers``; must be a valid number
country          ISO 3166-1 alpha-2, uppercase (from alpha-2, alpha-3, numeric or name)
postal_code      trimmed, uppercased, single spaces; US ZIP cut to 5 digits, zeros kept
first/last name  trimmed, inner whitespace collapsed, NFC; case and accents kept
city             as names
external_id,     ``str(value).strip()``; integral numbers without ``.0``
mobile_id
===============  ====================================================================

A value that cannot be normalised raises ``InvalidIdentifier`` (a ``ValueError``) whose message
names the identifier, shows the value in backticks and says what is wrong with it.

Emails take a fast path: a strict ASCII pattern accepts the common shape without calling
``email_validator`` (about 25 µs a call). It only ever *accepts* addresses that
``email_validator`` accepts with an identical normalised form; everything else, including every
rejection, goes through ``email_validator``. Phones likewise: numbers of the common shapes are
read with phonenumbers' own metadata in a few µs instead of ``phonenumbers.parse`` +
``is_valid_number`` (about 30 µs), and only accepted when phonenumbers would give the same
E.164 form. ``tests/unit/test_identity.py`` checks both claims with hypothesis.
"""

from __future__ import annotations

import functools
import gettext
import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import email_validator
import phonenumbers
import pycountry

from connector import __version__

__all__ = [
    "NORMALISATION_VERSION",
    "InvalidIdentifier",
    "NormalisedIdentifiers",
    "google_email",
    "hashed_name",
    "meta_city",
    "meta_phone",
    "meta_postal_code",
    "normalise_country",
    "normalise_email",
    "normalise_identifiers",
    "normalise_name",
    "normalise_phone",
    "normalise_postal_code",
    "normalise_text_id",
    "sha256_hex",
]


def _library_version(module: object) -> str:
    return str(getattr(module, "__version__", "?"))


NORMALISATION_RULES = 2
"""Revision of winback's own normalisation rules, raised whenever a change makes a value
normalise differently (2: country names in other languages, an unknown row country no longer
replaced by the default one, "00" numbers read in the region too, invisible characters trimmed,
UK, Canadian and Dutch postal codes spaced, fullwidth characters folded in postal codes)."""

NORMALISATION_VERSION = ";".join(
    [
        f"winback {__version__} rules {NORMALISATION_RULES}",
        f"phonenumbers {_library_version(phonenumbers)}",
        f"email-validator {_library_version(email_validator)}",
        f"pycountry {_library_version(pycountry)}",
    ]
)
"""What decides how a value normalises besides the sync's settings: a row skipped by one version
is checked again by another."""

_MAX_SHOWN = 80
"""Longest value quoted in full in an error message; longer ones are cut with an ellipsis."""


class InvalidIdentifier(ValueError):
    """An identifier value that cannot be normalised; the row keeps its other identifiers.

    ``identifier`` is the identifier's name (``email``, ``first_name``...), ``value`` the raw
    value and ``problem`` what is wrong with it; the message reads
    ``email `foo@` is not a valid address: <reason>``.
    """

    def __init__(self, identifier: str, value: object, problem: str) -> None:
        self.identifier = identifier
        self.value = value
        self.problem = problem
        super().__init__(f"{identifier} `{_shown(value)}` {problem}")


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _is_absent(value: object) -> bool:
    """None, NaN (how dataframes spell null) and empty or whitespace-only text are absent."""
    if value is None:
        return True
    if isinstance(value, str | bytes):
        return not value.strip()
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, Decimal):
        return value.is_nan()
    return False


def _as_text(value: object, field: str) -> str:
    """The value as text: integral numbers without ``.0``, bytes decoded as UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise InvalidIdentifier(field, value, "is a boolean, not an identifier")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidIdentifier(field, value, "is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidIdentifier(field, value, "is not a finite number")
        return str(int(value)) if value == value.to_integral_value() else str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidIdentifier(field, value, "is not valid UTF-8 text") from exc
    return str(value)


def _stripped(value: object, field: str) -> str:
    text = (value if value.__class__ is str else _as_text(value, field)).strip()
    if text and not (text[0].isprintable() and text[-1].isprintable()):
        text = _without_invisible_edges(text)
    if not text:
        raise InvalidIdentifier(field, value, "is empty")
    return text


def _without_invisible_edges(text: str) -> str:
    """``text`` without the invisible characters at its ends that `str.strip` keeps: a byte
    order mark, zero-width spaces and joiners, direction marks (format characters, category
    Cf), control characters, and whitespace between them. Inside the text they stay."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]) in "CfCc"):
        start += 1
    while end > start and (
        text[end - 1].isspace() or unicodedata.category(text[end - 1]) in "CfCc"
    ):
        end -= 1
    return text[start:end]


# ---------------------------------------------------------------------------------------- email

_EMAIL_SPECIAL_USE_SUFFIXES = tuple("." + name for name in email_validator.SPECIAL_USE_DOMAIN_NAMES)

_FAST_LOCAL_LETTERS = "".join(
    c
    for c in map(chr, range(0xDF, 0x180))
    if unicodedata.category(c) == "Ll" and c.lower() == c and unicodedata.normalize("NFC", c) == c
)
"""Lowercase Latin-1 and Latin Extended-A letters (``é``, ``ß``, ``ł``...), each its own NFC form.

email_validator accepts them in a dot-atom local part (RFC 6531) and returns them unchanged."""

# Only lowercase: a dot-atom local part over a subset of RFC 5322 atext plus the letters above,
# then at least two ASCII hostname labels (no "--" anywhere, so no Punycode or R-LDH labels)
# ending in an all-letter TLD. Lengths are checked separately. Anything else goes to
# email_validator.
_FAST_LOCAL_ATOM = f"[a-z0-9_+\\-{_FAST_LOCAL_LETTERS}]+"
_FAST_EMAIL = re.compile(
    rf"{_FAST_LOCAL_ATOM}(?:\.{_FAST_LOCAL_ATOM})*"
    r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}",
    re.ASCII,
)
_FAST_EMAIL_MAX = 254
"""In UTF-8 bytes, as email_validator counts."""
_FAST_LOCAL_MAX = 64


def _fast_email(text: str) -> bool:
    """True when ``text`` (already lowercased) is certainly valid and already normalised."""
    if len(text) > _FAST_EMAIL_MAX or _FAST_EMAIL.fullmatch(text) is None:
        return False
    if not text.isascii() and len(text.encode("utf-8")) > _FAST_EMAIL_MAX:
        return False
    local, _, domain = text.partition("@")
    return (
        len(local) <= _FAST_LOCAL_MAX
        and "--" not in domain
        and not ("." + domain).endswith(_EMAIL_SPECIAL_USE_SUFFIXES)
    )


_EMAIL_CHECKED_MAX = 1000
"""Longer values are refused without email_validator, whose checks grow with the length
(~2 ms for 5,000 characters); an address has at most 254."""


def _email(value: object, field: str) -> str:
    text = _stripped(value, field).lower()
    if _fast_email(text):
        return text
    if len(text) > _EMAIL_CHECKED_MAX:
        raise InvalidIdentifier(
            field,
            value,
            f"is not a valid address: it is {len(text):,} characters long (254 at most)",
        )
    try:
        result = email_validator.validate_email(
            text,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            allow_empty_local=False,
            globally_deliverable=True,
            test_environment=False,
        )
    except (email_validator.EmailNotValidError, UnicodeError) as exc:
        raise InvalidIdentifier(field, value, f"is not a valid address: {exc}") from exc
    return result.normalized.lower()


def normalise_email(value: object) -> str:
    """Trim, lowercase and syntax-check an email address (no DNS lookups).

    Internationalised addresses come back in email_validator's normalised form (NFC local part,
    Unicode domain). Raises ``InvalidIdentifier`` with email_validator's reason.
    """
    return _email(value, "email")


# ---------------------------------------------------------------------------------------- phone

NO_COUNTRY_CODE = "has no country code (write it as +<code>… or set a default country)"
NO_COUNTRY_CODE_UNKNOWN_COUNTRY = (
    "has no country code and the row's country is not recognised (write it as +<code>…)"
)

_PARSE_PROBLEMS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "has no valid country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "is not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "is too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "is too short",
    phonenumbers.NumberParseException.TOO_LONG: "is too long",
}


def _phone(value: object, region: str | None, field: str) -> str:
    e164, problem = _phone_text(_stripped(value, field), _region_code(region))
    if e164 is None:
        raise InvalidIdentifier(field, value, problem)
    return e164


@functools.lru_cache(maxsize=8192)
def _phone_text(text: str, region_code: str | None) -> tuple[str | None, str]:
    """``(e164, "")`` or ``(None, problem)`` for stripped ``text`` read in ``region_code``.

    Cached: households and companies share numbers. Each reading is first tried on the fast
    path (a few µs); what it does not accept goes to phonenumbers (about 25 µs).
    """
    if text.startswith("+"):
        return _reading(text, None)
    if text.startswith("00"):
        # "00" is the international prefix almost everywhere, but not everywhere: "0011" in
        # Australia, "001"-"008" by carrier in Singapore. The region's own reading and "00"
        # read as "+" are both tried; where both find a valid number and they differ, the
        # number is not guessed.
        abroad = _reading("+" + text[2:], None)
        at_home = _reading(text, region_code) if region_code is not None else (None, "")
        if at_home[0] is None:
            return abroad
        if abroad[0] is None or abroad[0] == at_home[0]:
            return at_home
        return None, (
            f"is ambiguous: {at_home[0]} as dialled in region {region_code}, {abroad[0]} "
            "with 00 as the international prefix (write it as +<code>…)"
        )
    if region_code is None:
        # A "+" phonenumbers finds after other characters ("(+44) 20...", "tel:+44...", a
        # fullwidth plus); without one the number has no country.
        e164, _ = _library_phone(text, None)
        return (e164, "") if e164 is not None else (None, NO_COUNTRY_CODE)
    return _reading(text, region_code)


def _reading(text: str, region_code: str | None) -> tuple[str | None, str]:
    """One reading of ``text``: on the fast path, else by phonenumbers."""
    e164 = _fast_phone(text, region_code)
    if e164 is not None:
        return e164, ""
    return _library_phone(text, region_code)


def _library_phone(text: str, region_code: str | None) -> tuple[str | None, str]:
    """One reading of ``text`` by phonenumbers: ``(e164, "")`` or ``(None, problem)``."""
    try:
        number = phonenumbers.parse(text, region_code)
    except phonenumbers.NumberParseException as exc:
        return None, _PARSE_PROBLEMS.get(exc.error_type, "is not a phone number")
    if _is_valid_number(number):
        e164: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        return e164, ""
    if region_code:
        return None, f"is not a valid phone number in region {region_code}"
    return None, f"is not a valid phone number for country code +{number.country_code}"


# The fast path reads the common shapes (digits with spaces, dots, dashes and brackets, an
# optional leading "+") the way phonenumbers.parse does, with the region metadata phonenumbers
# ships, and accepts a number only when phonenumbers would read it the same way and find it
# valid. Anything unusual (letters, extensions, "(0)" trunk notation in international numbers,
# leading zeros, national-prefix transform rules, country codes shared by regions told apart by
# leading digits, non-geographic codes) is left to phonenumbers. `tests/unit/test_identity.py`
# checks with hypothesis that both give the same answer for every reading.
_SIMPLE_PHONE = re.compile(r"\+?[0-9 ().\-]+", re.ASCII)
_PHONE_SEPARATORS = str.maketrans("", "", " ().-")
_MAX_PHONE_INPUT = 250
"""phonenumbers refuses longer input outright."""
_NSN_LENGTHS = range(2, 18)
"""National significant numbers phonenumbers accepts (2 to 17 digits)."""


@dataclass(frozen=True)
class _NumberDesc:
    lengths: frozenset[int]
    """Possible lengths; empty means any (the general description already checked them)."""
    pattern: re.Pattern[str]

    def matches(self, national: str) -> bool:
        return (not self.lengths or len(national) in self.lengths) and bool(
            self.pattern.fullmatch(national)
        )


def _number_desc(desc: object) -> _NumberDesc | None:
    pattern = getattr(desc, "national_number_pattern", None)
    if not pattern:
        return None
    return _NumberDesc(frozenset(getattr(desc, "possible_length", ()) or ()), re.compile(pattern))


_NUMBER_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
)


@dataclass(frozen=True)
class _RegionRules:
    """What the fast path needs of one region's phone metadata, compiled once."""

    country_code: int
    general: _NumberDesc
    types: tuple[tuple[frozenset[int], str], ...]
    """(possible lengths, pattern) of each number type; no lengths: the general ones."""
    possible_lengths: tuple[int, ...]
    local_only_lengths: frozenset[int]
    international_prefix: re.Pattern[str] | None
    national_prefix: re.Pattern[str] | None
    has_transform_rule: bool
    told_apart_by_leading_digits: bool
    _any_type: dict[int, re.Pattern[str] | None] = field(default_factory=dict, compare=False)

    def is_valid(self, national: str) -> bool:
        """phonenumbers' number type is not UNKNOWN (``is_valid_number_for_region``)."""
        if not self.general.matches(national):
            return False
        length = len(national)
        if length not in self._any_type:
            self._any_type[length] = self._any_type_pattern(length)
        any_type = self._any_type[length]
        return any_type is not None and any_type.fullmatch(national) is not None

    def _any_type_pattern(self, length: int) -> re.Pattern[str] | None:
        """The alternation of the type patterns allowed at this length: its ``fullmatch``
        succeeds exactly when one of theirs does. Compiled on first use (a few ms each)."""
        patterns = [p for own, p in self.types if not own or length in own]
        return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def without_national_prefix(self, national: str) -> str | None:
        """The national number as phonenumbers.parse leaves it after stripping the national
        prefix; None when a transform rule would apply (left to phonenumbers)."""
        if self.national_prefix is None or not national:
            return national
        match = self.national_prefix.match(national)
        if match is None:
            return national
        if self.has_transform_rule:
            return None
        stripped = national[match.end() :]
        if self.general.pattern.fullmatch(national) and not self.general.pattern.fullmatch(
            stripped
        ):
            return national
        return stripped if self._stripped_length_acceptable(len(stripped)) else national

    def _stripped_length_acceptable(self, length: int) -> bool:
        """``_test_number_length`` is IS_POSSIBLE or TOO_LONG (what parse keeps)."""
        if length in self.local_only_lengths:
            return False
        lengths = self.possible_lengths
        if length == lengths[0]:
            return True
        if lengths[0] > length:
            return False
        return lengths[-1] < length or length in lengths[1:]


@functools.cache
def _region_rules(region_code: str) -> _RegionRules | None:
    """The region's rules, or None (phonenumbers decides) when its metadata cannot be read the
    way this fast path expects (a phonenumbers release that changed its metadata objects)."""
    try:
        return _read_region_rules(region_code)
    except (AttributeError, TypeError, ValueError, re.error):
        return None


def _read_region_rules(region_code: str) -> _RegionRules | None:
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region_code, None)
    if metadata is None or metadata.country_code is None or metadata.general_desc is None:
        return None
    general = _number_desc(metadata.general_desc)
    possible = tuple(metadata.general_desc.possible_length or ())
    if general is None or not possible:
        return None
    names = list(_NUMBER_TYPES)
    if not metadata.same_mobile_and_fixed_line_pattern:
        names.append("mobile")
    types = []
    for name in names:
        desc = getattr(metadata, name, None)
        pattern = getattr(desc, "national_number_pattern", None)
        if pattern:
            types.append((frozenset(getattr(desc, "possible_length", ()) or ()), pattern))
    international = metadata.international_prefix
    national = metadata.national_prefix_for_parsing
    return _RegionRules(
        country_code=metadata.country_code,
        general=general,
        types=tuple(types),
        possible_lengths=possible,
        local_only_lengths=frozenset(metadata.general_desc.possible_length_local_only or ()),
        international_prefix=re.compile(international) if international else None,
        national_prefix=re.compile(national) if national else None,
        has_transform_rule=bool(metadata.national_prefix_transform_rule),
        told_apart_by_leading_digits=metadata.leading_digits is not None,
    )


@functools.cache
def _country_code_regions(country_code: int) -> tuple[str, ...]:
    return tuple(phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(country_code, ()))


def _split_country_code(digits: str) -> tuple[int, str] | None:
    """``_extract_country_code``: the first 1 to 3 leading digits that are a calling code."""
    if not digits or digits[0] == "0":
        return None
    for length in (1, 2, 3):
        code = int(digits[:length])
        if _country_code_regions(code):
            return code, digits[length:]
    return None


def _fast_phone(text: str, region_code: str | None) -> str | None:
    """The E.164 form phonenumbers would give ``text`` read in ``region_code``, when the
    number is of a common shape and valid; None leaves the decision to phonenumbers."""
    if len(text) > _MAX_PHONE_INPUT or _SIMPLE_PHONE.fullmatch(text) is None:
        return None
    digits = text.translate(_PHONE_SEPARATORS)
    if digits.startswith("+"):
        if len(digits) <= 3:  # TOO_SHORT_AFTER_IDD
            return None
        split = _split_country_code(digits[1:])
        if split is None:
            return None
        country_code, national = split
        regions = _country_code_regions(country_code)
        parse_rules = _region_rules(regions[0])  # the metadata parse strips the prefix with
    else:
        parse_rules = _region_rules(region_code) if region_code else None
        if parse_rules is None:
            return None
        prefix = parse_rules.international_prefix
        if (prefix is not None and prefix.match(digits)) or digits.startswith(
            str(parse_rules.country_code)
        ):
            return None  # an international number written with the IDD or the bare code
        country_code, national = parse_rules.country_code, digits
        regions = _country_code_regions(country_code)
    if parse_rules is None or len(national) not in _NSN_LENGTHS:
        return None
    significant = parse_rules.without_national_prefix(national)
    if significant is None or len(significant) not in _NSN_LENGTHS or significant[0] == "0":
        return None  # transform rule, or an Italian-style leading zero: phonenumbers decides
    # The region is_valid_number checks: the only one, or the first of a shared code when it is
    # not told apart by leading digits and the number is valid there (see _is_valid_number).
    rules = _region_rules(regions[0])
    if rules is None or (len(regions) > 1 and rules.told_apart_by_leading_digits):
        return None
    return f"+{country_code}{significant}" if rules.is_valid(significant) else None


@functools.cache
def _main_regions() -> dict[int | None, str]:
    """Country codes shared by several regions whose first region has no leading digits."""
    main: dict[int | None, str] = {}
    for country_code, regions in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items():
        if len(regions) > 1:
            metadata = phonenumbers.PhoneMetadata.metadata_for_region(regions[0], None)
            if metadata is not None and metadata.leading_digits is None:
                main[country_code] = regions[0]
    return main


def _is_valid_number(number: phonenumbers.PhoneNumber) -> bool:
    """``phonenumbers.is_valid_number``, skipping its region search for most shared codes.

    ``is_valid_number`` checks the number against the region ``region_code_for_number`` picks.
    For a code shared by several regions (+1: US, CA, ...) that function tries the regions in
    order and picks the first whose leading digits match or whose number patterns the number
    fits. When the first region (US for +1, GB for +44) has no leading digits and the number is
    valid there, it fits that region's patterns, so that region is picked and the number is valid:
    one pattern check instead of two. Any other number takes the library's own path.
    """
    main = _main_regions().get(number.country_code)
    if main is not None and phonenumbers.is_valid_number_for_region(number, main):
        return True
    valid: bool = phonenumbers.is_valid_number(number)
    return valid


def normalise_phone(value: object, *, region: str | None = None) -> str:
    """Return the number in E.164 form with ``+`` (``+18005550100``).

    ``region`` (ISO alpha-2) is how a number written without ``+`` or ``00`` is read; without it
    such numbers are rejected. Raises ``InvalidIdentifier`` when the value does not parse or is
    not a valid number according to ``phonenumbers.is_valid_number``.
    """
    return _phone(value, region, "phone")


# -------------------------------------------------------------------------------------- country

_COUNTRY_ALIASES = {
    "uk": "GB",
    "great britain": "GB",
    "britain": "GB",
    "england": "GB",
    "scotland": "GB",
    "wales": "GB",
    "northern ireland": "GB",
    "russia": "RU",
    "turkey": "TR",
    "ivory coast": "CI",
    "cape verde": "CV",
    "swaziland": "SZ",
    "macedonia": "MK",
    "holland": "NL",
    "vatican": "VA",
    "vatican city": "VA",
    "brunei": "BN",
    "palestine": "PS",
    "dr congo": "CD",
    "democratic republic of the congo": "CD",
    "republic of korea": "KR",
    "micronesia": "FM",
    "uae": "AE",
    "burma": "MM",
    "macau": "MO",
    "us virgin islands": "VI",
    "british virgin islands": "VG",
}
"""Everyday names pycountry does not know (``UK`` is reserved, not assigned, in ISO 3166)."""

# fmt: off
_NAME_LANGUAGES = (
    "de", "fr", "es", "it", "pt", "pt_BR", "nl", "pl", "sv", "da", "nn", "fi", "cs", "sk", "ro",
    "hu", "el", "tr", "ru", "uk", "ca", "hr", "sl", "bg", "sr", "lt", "lv", "et", "is", "ga",
    "id", "ms", "vi", "ja", "ko", "zh_CN", "zh_TW", "ar", "he", "th", "hi", "eu", "gl", "cy",
)
# fmt: on
"""Languages whose names of the countries are recognised too (pycountry's translations of
ISO 3166: ``Deutschland``, ``España``, ``Italia``...)."""

_BRACKETED = re.compile(r"\s*\([^)]*\)")


def _country_key(text: str) -> str:
    """Lookup key ignoring case, accents, punctuation and spacing: ``U.S.`` -> ``us``; ``&``
    reads ``and``, a leading ``St.`` ``Saint``."""
    folded = unicodedata.normalize("NFKD", text.casefold().replace("-", " ").replace("&", " and "))
    kept = "".join(c for c in folded if unicodedata.category(c)[0] not in "MP")
    key = " ".join(kept.split()).removeprefix("the ")
    return "saint " + key[3:] if key.startswith("st ") else key


def _country_names(country: Any) -> list[str]:
    """A country's English names in pycountry, each also without a bracketed part
    (``Falkland Islands (Malvinas)``)."""
    names = [country.name] + [
        getattr(country, a, None) or "" for a in ("official_name", "common_name")
    ]
    return [variant for name in names if name for variant in (name, _BRACKETED.sub("", name))]


@functools.cache
def _country_index() -> dict[str, str]:
    """Lookup key → alpha-2 code, for the codes, English names and everyday names."""
    index: dict[str, str] = {}
    for country in pycountry.countries:
        code: str = country.alpha_2
        names = [country.alpha_2, country.alpha_3, country.numeric, str(int(country.numeric))]
        for name in names + _country_names(country):
            index.setdefault(_country_key(name), code)
    for alias, code in _COUNTRY_ALIASES.items():
        index.setdefault(alias, code)
    return index


@functools.cache
def _translated_country_index() -> dict[str, str]:
    """Lookup key → alpha-2 code for the country names of `_NAME_LANGUAGES` (built on the first
    name the English index does not know). A name two countries share in different languages
    is left out, and one the English index knows keeps its English meaning."""
    english = _country_index()
    found: dict[str, str | None] = {}
    for language in _NAME_LANGUAGES:
        try:
            translation = gettext.translation(
                "iso3166-1", pycountry.LOCALES_DIR, languages=[language]
            )
        except OSError:  # a pycountry without this language
            continue
        for country in pycountry.countries:
            code = country.alpha_2
            for name in _country_names(country):
                key = _country_key(translation.gettext(name))
                if key and key not in english:
                    found[key] = code if found.get(key, code) == code else None
    return {key: code for key, code in found.items() if code is not None}


def _country(value: object, field: str) -> str:
    code = _country_code(_stripped(value, field))
    if code is None:
        raise InvalidIdentifier(field, value, "is not an ISO 3166 country code or country name")
    return code


@functools.lru_cache(maxsize=1024)
def _country_code(text: str) -> str | None:
    """The alpha-2 code for stripped ``text``, or None; cached, as a column has few values."""
    index = _country_index()
    # Plain codes and names are keys as they are; only the rest pays for accent folding.
    code = index.get(text.casefold())
    if code is None:
        key = _country_key(text)
        code = index.get(key) or _translated_country_index().get(key)
    return code


@functools.lru_cache(maxsize=256)
def _region_code(region: str | None) -> str | None:
    """A default region as an alpha-2 code (``uk`` -> ``GB``); unknown ones pass through upper."""
    if region is None or not region.strip():
        return None
    return _country_index().get(_country_key(region), region.strip().upper())


def normalise_country(value: object) -> str:
    """Return the ISO 3166-1 alpha-2 code, uppercase: ``"germany"``/``"DEU"``/``"de"`` -> ``DE``.

    Accepts alpha-2, alpha-3 and numeric codes and the English names pycountry knows (short,
    official and common, with or without a bracketed part), ignoring case, accents and dots
    (``&`` for ``and``, ``St.`` for ``Saint``), plus a few everyday names such as ``UK`` and
    ``England`` (both ``GB``), and the names in about forty other languages pycountry
    translates (``Deutschland``, ``España``). Raises ``InvalidIdentifier`` for anything else.
    """
    return _country(value, "country")


# ---------------------------------------------------------------------------------------- names


def _name(value: object, field: str) -> str:
    name = _name_text(_stripped(value, field))
    if name is None:
        raise InvalidIdentifier(field, value, "has no letters")
    return name


@functools.lru_cache(maxsize=4096)
def _name_text(text: str) -> str | None:
    """The normalised name for stripped ``text``, or None without letters; cached (few names)."""
    name = " ".join(unicodedata.normalize("NFC", text).split())
    return name if any(c.isalpha() for c in name) else None


def normalise_name(value: object) -> str:
    """Trim, collapse inner whitespace and compose accents (NFC); case and accents are kept.

    Adapters lowercase, strip punctuation or hash per platform (see ``hashed_name``). Raises
    ``InvalidIdentifier`` when the value is empty or has no letters at all.
    """
    return _name(value, "name")


# ---------------------------------------------------------------------------------- postal code

_ZIP_COUNTRIES = frozenset({"US", "PR", "VI", "GU", "AS", "MP"})
"""The US and the territories that use US ZIP codes."""
_ZIP = re.compile(r"(\d{5})(?:[- ]?\d{4})?", re.ASCII)


_SPACED_POSTAL_CODES = {
    "GB": (re.compile(r"[A-Z]{1,2}[0-9][A-Z0-9]?[0-9][A-Z]{2}", re.ASCII), 3),
    "GG": (re.compile(r"GY[0-9]{1,2}[0-9][A-Z]{2}", re.ASCII), 3),
    "JE": (re.compile(r"JE[0-9]{1,2}[0-9][A-Z]{2}", re.ASCII), 3),
    "IM": (re.compile(r"IM[0-9]{1,2}[0-9][A-Z]{2}", re.ASCII), 3),
    "CA": (re.compile(r"[A-Z][0-9][A-Z][0-9][A-Z][0-9]", re.ASCII), 3),
    "NL": (re.compile(r"[1-9][0-9]{3}[A-Z]{2}", re.ASCII), 2),
}
"""Countries whose postal codes are written with one space at a fixed place from the end
(``SW1A 1AA``, ``K1A 0B1``, ``1011 AB``): the code without spaces, and where the space goes."""


def _postal_code(value: object, country: str | None, field: str) -> str:
    text = unicodedata.normalize("NFKC", _stripped(value, field)).upper()
    text = " ".join(text.split())
    region = _region_code(country)
    spaced = _SPACED_POSTAL_CODES.get(region or "")
    if spaced is not None:
        pattern, inward = spaced
        compact = text.replace(" ", "")
        if pattern.fullmatch(compact):
            return f"{compact[:-inward]} {compact[-inward:]}"
    if region not in _ZIP_COUNTRIES:
        return text
    digits = text.isascii() and text.isdigit()
    if digits and isinstance(value, int | float | Decimal) and len(text) != 6:
        # A numeric column has lost the leading zeros: 2134 is 02134, 21341234 is 02134-1234.
        text = text.zfill(5 if len(text) <= 5 else 9)
    elif digits and len(text) in (3, 4):
        text = text.zfill(5)  # text that went through a spreadsheet and lost its zeros
    match = _ZIP.fullmatch(text)
    if match is None:
        raise InvalidIdentifier(field, value, "is not a US ZIP code (12345 or 12345-6789)")
    return match.group(1)


def normalise_postal_code(value: object, *, country: str | None = None) -> str:
    """Trim, uppercase, fold fullwidth characters and collapse spaces (``" sw1a   1aa"`` ->
    ``SW1A 1AA``); in the UK (and GG, JE, IM), Canada and the Netherlands, a code of the
    country's shape gets its one space in place (``SW1A1AA`` -> ``SW1A 1AA``, ``k1a0b1`` ->
    ``K1A 0B1``, ``1011AB`` -> ``1011 AB``).

    For the US and its ZIP-code territories the result is the 5-digit ZIP: ZIP+4 is cut and
    leading zeros lost by numeric columns are restored (``2134`` -> ``02134``). Raises
    ``InvalidIdentifier`` when empty or, for the US, not a ZIP code.
    """
    return _postal_code(value, country, "postal_code")


# ------------------------------------------------------------------------------------ plain ids


def _text_id(value: object, field: str) -> str:
    return _stripped(value, field)


def normalise_text_id(value: object) -> str:
    """Return an opaque id (external id, mobile ad id) as trimmed text; ``42.0`` becomes ``42``.

    Raises ``InvalidIdentifier`` when empty.
    """
    return _text_id(value, "id")


# ---------------------------------------------------------------------------------------- a row


class NormalisedIdentifiers(NamedTuple):
    """The usable identifiers of one row and a message for each one that was present but bad
    (a tuple: one is built per segment row)."""

    identifiers: dict[str, str]
    problems: list[str]


_Normaliser = Callable[[object, str | None, str], str]

_ROW_NORMALISERS: dict[str, _Normaliser] = {
    "email": lambda value, _region, field: _email(value, field),
    "phone": _phone,
    "first_name": lambda value, _region, field: _name(value, field),
    "last_name": lambda value, _region, field: _name(value, field),
    "city": lambda value, _region, field: _name(value, field),
    "postal_code": _postal_code,
    "external_id": lambda value, _region, field: _text_id(value, field),
    "mobile_id": lambda value, _region, field: _text_id(value, field),
}


def _other(value: object, _region: str | None, field: str) -> str:
    return _text_id(value, field)


def normalise_identifiers(
    raw: Mapping[str, object], *, default_country: str | None = None
) -> NormalisedIdentifiers:
    """Normalise one row's identifiers, keyed by identifier name; never raises for bad values.

    Absent values (None, NaN, empty or whitespace-only text) are left out silently; invalid ones
    are left out with a message in ``problems``. Phones and postal codes are read in the row's
    country, or in ``default_country`` when the row has none; when the row's country is not
    recognised, in no country (a phone then needs its +<code>). Names outside
    ``IDENTIFIER_NAMES`` are treated as plain text ids.
    """
    identifiers: dict[str, str] = {}
    problems: list[str] = []
    region, country_unknown = default_country, False
    country = raw.get("country")
    if not _is_absent(country):
        try:
            region = identifiers["country"] = _country(country, "country")
        except InvalidIdentifier as exc:
            problems.append(str(exc))
            # Not the default country's: the person's country is known to be another one.
            # A phone without its country code is then left out rather than guessed.
            region, country_unknown = None, True
    normalisers = _ROW_NORMALISERS
    for name, value in raw.items():
        if name == "country":
            continue
        if value.__class__ is str:  # the common case, as _is_absent would decide it
            if not value.strip():
                continue
        elif _is_absent(value):
            continue
        try:
            identifiers[name] = normalisers.get(name, _other)(value, region, name)
        except InvalidIdentifier as exc:
            if country_unknown and exc.problem == NO_COUNTRY_CODE:
                exc = InvalidIdentifier(name, value, NO_COUNTRY_CODE_UNKNOWN_COUNTRY)
            problems.append(str(exc))
    return NormalisedIdentifiers(identifiers, problems)


# -------------------------------------------------------------------- per-platform last mile


def sha256_hex(value: str) -> str:
    """SHA-256 of the UTF-8 bytes of ``value`` as 64 lowercase hex characters (``H(x)``)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


_E164 = re.compile(r"\+[1-9][0-9]{6,14}", re.ASCII)


def meta_phone(e164: str) -> str:
    """Meta's phone form: digits only with the country code, no ``+`` (``18005550100``).

    Takes the output of ``normalise_phone``; E.164 has already dropped the ``00`` prefix and the
    national trunk ``0`` Meta asks to remove. Raises ``InvalidIdentifier`` for anything else.
    """
    if _E164.fullmatch(e164) is None:
        raise InvalidIdentifier("phone", e164, "is not in E.164 form (+ and 7 to 15 digits)")
    return e164[1:]


_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def google_email(email: str) -> str:
    """Google Data Manager's email form: lowercase with all whitespace removed.

    For ``gmail.com`` and ``googlemail.com`` addresses the local part also loses its dots and
    any ``+suffix`` (``Jane.Doe+promo@GMail.com`` -> ``janedoe@gmail.com``); other domains keep
    theirs. The domain itself is not rewritten.
    """
    text = "".join(email.lower().split())
    local, at, domain = text.rpartition("@")
    if at and domain in _GMAIL_DOMAINS:
        return local.partition("+")[0].replace(".", "") + "@" + domain
    return text


def _without_punctuation(text: str) -> str:
    return "".join(c for c in text if unicodedata.category(c)[0] not in "PS")


def hashed_name(name: str) -> str:
    """A first or last name as Meta (``FN``/``LN``) and Google (``givenName``...) hash it.

    Lowercase, drop punctuation and symbols (``O'Brien-Smith`` -> ``obriensmith``), collapse
    whitespace to single spaces and trim. Letters keep their accents (NFC), as Meta's docs allow
    UTF-8 letters; digits are kept. Titles and suffixes (``Mrs.``, ``Jr.``) are not removed.
    """
    text = _without_punctuation(unicodedata.normalize("NFC", name).lower())
    return " ".join(text.split())


def meta_postal_code(postal_code: str, *, country: str | None = None) -> str:
    """Meta's ``ZIP`` form: lowercase without spaces; US (and ZIP territories) first 5 digits."""
    if _region_code(country) in _ZIP_COUNTRIES:
        return _postal_code(postal_code, "US", "postal_code")
    return "".join(postal_code.lower().split())


def meta_city(city: str) -> str:
    """Meta's ``CT`` form: lowercase letters and digits only, no spaces or punctuation."""
    return "".join(c for c in unicodedata.normalize("NFC", city).lower() if c.isalnum())
