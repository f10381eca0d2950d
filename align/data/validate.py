"""Row validation: the bad-row policy, its report, and the canonical-record checks.

Two kinds of problem:

- a file-level problem (missing file, empty file, not JSON / not the expected format, a gzip stream
  that is cut short, a CSV without the expected columns) cannot be skipped: `DataError` always.
- a row-level problem (a missing field, a wrong type, an empty string, ``chosen == rejected``, an
  unknown rating or role, bytes that are not UTF-8, a line that is not JSON) is a `BadRow`. The
  policy `data.bad_rows` decides: ``fail`` raises a `DataError` on the first one, naming the file,
  the line, the problem and the fix; ``skip`` drops the row and counts it by reason in a `DataReport`.

Importers raise `BadRow` for problems in the source format (named by the source's field names);
`check_record` then checks every canonical record against align/data/schema.py, so no importer
can hand a malformed record to a stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from align.data.schema import CATEGORIES, FEATURES, RATINGS, ROLES
from align.errors import AlignError

N_EXAMPLES = 5  # skipped rows quoted in a report; the counts cover all of them
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(AlignError):
    """A data file or row the user must fix; the message names the file, the line and the fix."""


class BadRow(Exception):
    """One malformed row. ``reason`` is the short, countable problem ("'chosen' is empty");
    ``detail`` is the row-specific part (a JSON parser's column) that is shown but not counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + detail)
        self.reason = reason
        self.detail = detail


@dataclass
class DataReport:
    """What loading one dataset did.

    n_read counts source rows (lines, JSON-list items, CSV rows, OASST trees; generated items for
    synthetic_*). n_records counts the canonical records that passed validation (an OASST tree
    gives several), n_kept those left after ``limit``. ``skipped`` counts dropped rows by reason
    (a row that gives several records, such as an OASST tree, counts each bad record); ``examples``
    quotes the first few as "line N: reason". ``unit`` names a row's position: "line" (1-based) in
    a text file, "index" (0-based, as `datasets` numbers rows) in a Parquet/Arrow table.
    """

    path: str
    format: str
    kind: str
    n_read: int = 0
    n_records: int = 0
    n_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    unit: str = "line"

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = (
            f"{self.path} ({self.format} -> {self.kind}): read {self.n_read} rows, "
            f"{self.n_records} records, kept {self.n_kept}"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {self.n_skipped} ({reasons})"
        return text


class RowPolicy:
    """Applies ``data.bad_rows`` to the bad rows of one file and keeps its `DataReport`."""

    def __init__(self, report: DataReport, bad_rows: Literal["fail", "skip"] = "fail"):
        if bad_rows not in ("fail", "skip"):
            raise ValueError(f"bad_rows must be 'fail' or 'skip', got {bad_rows!r}")
        self.report = report
        self.bad_rows = bad_rows

    def bad(self, line: int, problem: BadRow) -> None:
        """Raise (fail) or count (skip) the bad row at ``line`` (in the report's unit)."""
        if self.bad_rows == "fail":
            fix = "fix the row or set data.bad_rows: skip"
            if self.report.n_records == 0 and not self.report.skipped and self.report.n_read == 1:
                # The very first row: more likely the wrong format or file than one bad row.
                fix += (
                    f" (if every row looks like this, this is not a {self.report.format} file: check format and path)"
                )
            raise DataError(f"{self.report.path} {self.report.unit} {line}: {problem.reason}{problem.detail}; {fix}")
        self.report.skipped[problem.reason] = self.report.skipped.get(problem.reason, 0) + 1
        if len(self.report.examples) < N_EXAMPLES:
            self.report.examples.append(f"{self.report.unit} {line}: {problem.reason}{problem.detail}")

    def file_error(self, problem: str) -> DataError:
        """A problem with the whole file, which no policy can skip."""
        return DataError(f"{self.report.path}: {problem}")


def not_utf8(text: str) -> int | None:
    """Index of the first character that cannot be written as UTF-8, or None.

    Readers decode with ``errors="surrogateescape"``, so an undecodable byte becomes a lone
    surrogate here and the row it sits in can be named (and skipped) instead of failing the file.
    """
    found = _SURROGATE.search(text)
    return None if found is None else found.start()


def check_record(record: dict, kind: str) -> None:
    """Raise `BadRow` unless ``record`` is a valid canonical record of ``kind`` (schema.py)."""
    expected = set(FEATURES[kind])
    if set(record) != expected:
        # An importer bug, not a data problem, but still caught here rather than by Arrow later.
        raise BadRow(f"record has fields {sorted(record)}, expected {sorted(expected)}")
    _check_str(record, "source", allow_empty=False)
    if kind == "conversation":
        _check_conversation(record)
    elif kind == "preference":
        _check_preference(record)
    elif kind == "prompt":
        _check_messages(record["prompt"], "prompt", last_role="user", fields=("role", "content"))
        _check_bool(record, "safety", optional=False)
    else:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(FEATURES)}")


def _check_conversation(record: dict) -> None:
    messages = record["messages"]
    _check_messages(messages, "messages", last_role="assistant", fields=("role", "content", "train"))
    for i, message in enumerate(messages):
        if not isinstance(message["train"], bool):
            raise BadRow(f"'messages' item {i + 1}: 'train' must be true or false")
        if message["train"] and message["role"] != "assistant":
            raise BadRow(
                f"'messages' item {i + 1}: 'train' is true on a {message['role']} turn (only assistant turns carry loss)"
            )
    if not any(m["train"] for m in messages):
        raise BadRow("conversation has no assistant turn to train on")


def _check_preference(record: dict) -> None:
    _check_messages(record["prompt"], "prompt", last_role="user", fields=("role", "content"))
    _check_str(record, "chosen", allow_empty=False)
    _check_str(record, "rejected", allow_empty=False)
    if record["chosen"] == record["rejected"]:
        raise BadRow("'chosen' and 'rejected' are the same text")
    if record["rating"] not in RATINGS:
        raise BadRow(f"unknown rating {record['rating']!r}", f" (expected one of {', '.join(RATINGS)})")
    if record["category"] not in CATEGORIES:
        raise BadRow(f"unknown category {record['category']!r}", f" (expected one of {', '.join(CATEGORIES)})")
    _check_bool(record, "chosen_safe", optional=True)
    _check_bool(record, "rejected_safe", optional=True)
    margin = record["margin"]
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)
    ):
        raise BadRow("'margin' must be a finite number or null", f" (got {margin!r})")


def _check_messages(messages, name: str, last_role: str | None, fields: tuple[str, ...]) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"'{name}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != set(fields):
            raise BadRow(f"'{name}' item {i + 1} is not a message with fields {', '.join(fields)}")
        role = message["role"]
        if role not in ROLES:
            raise BadRow(f"unknown role {role!r}", f" in '{name}' item {i + 1} (expected one of {', '.join(ROLES)})")
        content = message["content"]
        if not isinstance(content, str):
            raise BadRow(f"'{name}' content must be a string", f" (item {i + 1} is {type(content).__name__})")
        if not content.strip():
            raise BadRow(f"'{name}' has an empty message", f" (item {i + 1}, {role})")
        if not_utf8(content) is not None:
            raise BadRow("text is not valid UTF-8 (undecodable bytes)", f" in '{name}' item {i + 1}")
    if last_role is not None and messages[-1]["role"] != last_role:
        article = "an" if last_role == "assistant" else "a"
        raise BadRow(f"'{name}' must end with {article} {last_role} turn", f" (it ends with {messages[-1]['role']})")


def _check_str(record: dict, name: str, allow_empty: bool) -> None:
    value = record[name]
    if not isinstance(value, str):
        raise BadRow(f"'{name}' must be a string", f" (got {type(value).__name__})")
    if not allow_empty and not value.strip():
        raise BadRow(f"'{name}' is empty")
    if not_utf8(value) is not None:
        raise BadRow("text is not valid UTF-8 (undecodable bytes)", f" in '{name}'")


def _check_bool(record: dict, name: str, optional: bool) -> None:
    value = record[name]
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise BadRow(f"'{name}' must be true or false{' or null' if optional else ''}", f" (got {value!r})")
