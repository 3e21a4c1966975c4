"""The `rules` segment type: inactivity described declaratively, compiled to one SQL query.

Modules: ``model`` (pydantic config models, durations), ``query`` (the SQLAlchemy Core query and
how it is built), ``dialects`` (the few per-warehouse expressions), ``compiler`` (checks against
the warehouse, ``compile_rules`` and ``explain_rules``).
"""

from connector.rules.compiler import (
    RulesExplanation,
    SignalCounts,
    compile_rules,
    explain_rules,
    locate_run_failure,
    printable_sql,
    run_failure_message,
)
from connector.rules.model import (
    COMPUTED_COLUMNS,
    Exclusion,
    RulesSegment,
    Signal,
    parse_duration,
)

__all__ = [
    "COMPUTED_COLUMNS",
    "Exclusion",
    "RulesExplanation",
    "RulesSegment",
    "Signal",
    "SignalCounts",
    "compile_rules",
    "explain_rules",
    "locate_run_failure",
    "parse_duration",
    "printable_sql",
    "run_failure_message",
]
