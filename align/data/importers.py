"""Importers: one per format in `align.config.DATA_FORMATS`, each reading a real public file format
and yielding ``(line, record)`` in a canonical schema of align/data/schema.py.

The caller names the canonical kind it wants ("conversation" | "preference" | "prompt");
`FORMAT_KINDS` says which kinds each format can give, and asking for another is a `DataError`.

Formats and their mappings (the ``source`` field of every record is the format name, except xstest):

- ``alpaca``: a JSON list of ``{"instruction", "input", "output"}`` (``input`` may be absent; other
  keys are ignored). conversation: user = instruction, or instruction + "\\n\\n" + input when input is
  non-empty; assistant = output, train=True.
- ``oasst``: JSON Lines, one OpenAssistant message tree per line: ``{"prompt": message}``, a message
  being ``{"text", "role": "prompter" | "assistant", "replies": [message], "rank"?, "deleted"?}``
  with ``rank`` 0 = best among its siblings (absent or null = unranked). Deleted messages are
  left out. prompter -> user.

  * conversation: one per tree, the best-ranked path. At a prompter message take the rank-0
    assistant reply (the first reply when none is ranked); at an assistant message the prompter
    follow-ups carry no rank, so take the first one (export order) that has an answer. The path
    ends at its last assistant turn; every assistant turn is train=True.
  * preference: at every prompter message with >= 2 ranked assistant replies, every pair of
    replies with different ranks (better rank -> chosen) with the conversation up to and including
    that prompter message as the prompt; equal ranks give no pair. Rank gap -> rating:
    gap >= 3 significantly_better, 2 better, 1 slightly_better (`OASST_GAP_RATINGS`; the ranks
    are too coarse for negligibly_better, so it is never given). category helpfulness.
  * prompt: the tree's first prompter message, safety=False.
- ``hh``: (gzip) JSON Lines ``{"chosen": str, "rejected": str}``, each a whole dialogue
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (Anthropic HH-RLHF). Turns are split on the
  ``Human:``/``Assistant:`` markers, stripped of surrounding whitespace, and consecutive turns of
  one speaker (8 rows of harmless-base-test) are joined with "\\n\\n".

  * preference: prompt = the turns up to and including the last Human turn (it must be the same in
    both dialogues); chosen / rejected = the Assistant text after it. HH gives no rating level, so
    every pair is rated ``HH_RATING`` ("better"); category safety (the importer serves the
    harmless split; override with the dataset's ``category``); chosen_safe / rejected_safe None
    (HH says which answer is less harmful, not whether either is safe). A final Assistant turn
    that is empty (3 rows of harmless-base-test) is a bad row: "'chosen' is empty".
  * prompt: the first Human turn, safety=True.
- ``xstest``: CSV with at least the columns ``prompt`` and ``label`` (XSTest: ``id,prompt,type,
  label,focus,note``). prompt: safety = (label == "unsafe"); source "xstest:safe" / "xstest:unsafe".
- ``sharegpt_dpo``: a JSON list of ``{"conversations": [{"from", "value"}], "chosen": {"from":
  "gpt", "value"}, "rejected": {...}, "system"?}`` (LLaMA-Factory). from human -> user, gpt ->
  assistant, system -> system; a top-level ``system`` string becomes a first system turn.
  preference: no rating level is given: ``SHAREGPT_DPO_RATING`` ("better"); category helpfulness.
- ``trl_jsonl``: JSON Lines in TRL's preference format: ``prompt`` a string (one user turn) or a
  list of ``{"role", "content"}``; ``chosen`` / ``rejected`` a string or a list holding one assistant
  message. Optional: ``margin`` (number -> ``margin``), ``rating`` (one of RATINGS; absent ->
  ``TRL_DEFAULT_RATING``, "better"), ``category`` (absent -> helpfulness), ``chosen_safe`` /
  ``rejected_safe`` (true/false). Other keys are ignored.
- ``trl_jsonl`` with an implicit prompt (TRL's other preference form): no ``prompt``; ``chosen`` /
  ``rejected`` are whole conversations (lists of messages). The prompt is the messages both start
  with; after it each must hold exactly one assistant message. Numeric ratings, and margins when
  no rating is given, are mapped to RATINGS by the dataset's ``rating_thresholds`` (`_level`).
- ``oasst_prompts``: JSON Lines, one prompt per line, either a JSON string (the shipped
  prompt_lottery_en_250_text.jsonl) or ``{"text": str}``. prompt: safety=False.
- ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content", "train"? |
  "weight"?}]}`` (TRL conversational / OpenAI chat fine-tuning). ``train`` (true/false) or
  ``weight`` (0/1) says whether an assistant turn carries loss (absent: it does); system turns are
  kept. conversation: must end with an assistant turn. prompt: the turns up to and including the
  last user turn (a row that ends with a user turn is a prompt as it stands); optional ``safety``.
- ``sharegpt``: ``{"conversations": [{"from": "human" | "gpt" | "system", "value"}], "system"?}``;
  mapped as sharegpt_dpo, every gpt turn trained. conversation and prompt as for messages.
- ``prompts``: prompt-only rows: ``{"prompt": str | [messages]}`` or ``{"messages": [...]}`` (as in
  messages), optional ``safety`` (true/false, absent = false).
- ``ultrafeedback``: ``{"chosen": [messages], "rejected": [messages], "score_chosen", "score_rejected"}``
  (HuggingFaceH4/ultrafeedback_binarized; its ``prompt`` column repeats the first user turn and is not
  read). The prompt is implicit, as in trl_jsonl. score_chosen - score_rejected must be > 0; the gap
  is mapped to RATINGS by ``rating_thresholds`` (default `ULTRAFEEDBACK_THRESHOLDS`: >= 3
  significantly_better, >= 2 better, >= 1 slightly_better, below negligibly_better). helpfulness.
- ``synthetic_sft`` / ``synthetic_pref`` / ``synthetic_prompts``: generated in code (no file),
  deterministic in the seed, ``limit`` records (64 when limit is 0). synthetic_pref is easy to
  learn: chosen answers share one polite template, rejected ones are shouting, junk or curt, further
  from the template the stronger the rating; all 4 ratings appear; a third of the pairs are
  risky requests with safety labels (chosen_safe=True, rejected_safe=False).

Containers: messages, sharegpt, prompts and ultrafeedback read JSON Lines or a JSON list (.json,
.jsonl, gzip or not). Every file format also reads a table: ``.parquet``, ``.arrow`` (Arrow IPC file
or stream) or a `datasets` ``save_to_disk`` folder; its rows go through the same checks, named by
their 0-based index. In a table a null field counts as absent (Arrow gives every row every column).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from align.config import DATA_FORMATS, DatasetSpec
from align.data.schema import FEATURES, RATINGS
from align.data.validate import BadRow, DataError, DataReport, RowPolicy, check_record, not_utf8

# Rank gap (worse rank - better rank) -> rating; a gap of 3 or more is significantly_better.
OASST_GAP_RATINGS = {1: "slightly_better", 2: "better"}
OASST_MAX_GAP_RATING = "significantly_better"
# Sources that give no rating level: every pair gets one level, "better" (the second-strongest of
# the four: the labels are confident choices, but how much better is unknown).
HH_RATING = "better"
SHAREGPT_DPO_RATING = "better"
TRL_DEFAULT_RATING = "better"
# Score gap (score_chosen - score_rejected, on UltraFeedback's 1-10 scale) at or above which a pair is
# significantly_better, better, slightly_better: one point per level; below the last negligibly_better.
ULTRAFEEDBACK_THRESHOLDS = (3.0, 2.0, 1.0)
TABLE_SUFFIXES = (".parquet", ".arrow")
_TABLE_BATCH = 1024  # rows per Arrow batch read from a table
SYNTHETIC_SIZE = 64  # records generated by synthetic_* when the dataset's limit is 0

Row = object  # a parsed source row (a JSON value or a CSV row dict) or the BadRow it could not be


# ---------------------------------------------------------------------------------------------
# The dispatcher


def iter_records(
    spec: DatasetSpec, kind: str, path: Optional[Path] = None, policy: Optional[RowPolicy] = None, seed: int = 0
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, record)`` for the valid canonical ``kind`` records of one dataset.

    ``line`` is the 1-based line where the source row starts (the item number for synthetic_*; the
    0-based row index for a table, see `is_table`). ``path`` is the resolved file (unused by
    synthetic_*). Bad rows go to ``policy`` (default: a ``fail`` policy, which raises `DataError` on
    the first); its report counts rows and records.
    A file with no rows, or with no usable record, is a `DataError` whatever the policy.
    """
    if kind not in FEATURES:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(FEATURES)}")
    fmt = _FORMATS[spec.format]
    if kind not in fmt.kinds:
        able = ", ".join(name for name, f in _FORMATS.items() if kind in f.kinds)
        raise DataError(
            f"{path or spec.format}: dataset format {spec.format!r} cannot give {kind} records (it "
            f"gives: {', '.join(fmt.kinds)}); formats that give {kind} records: {able}"
        )
    if fmt.generate is None and path is None:
        raise ValueError(f"format {spec.format!r} reads a file: pass its path")
    if policy is None:
        label = str(path) if fmt.generate is None else f"<{spec.format}>"
        policy = RowPolicy(DataReport(path=label, format=spec.format, kind=kind), "fail")
    report = policy.report

    if fmt.generate is not None:
        size = spec.limit or SYNTHETIC_SIZE
        rows: Iterator[tuple[int, Row]] = enumerate(fmt.generate(size, seed, spec), 1)
        convert: Callable[[Row, str, DatasetSpec], list[dict]] = lambda row, _kind, _spec: [row]  # canonical
    elif is_table(path):
        report.unit = "index"
        rows, convert = _table_rows(path, policy), fmt.convert
    else:
        rows, convert = fmt.read(path, policy), fmt.convert

    for line, row in rows:
        report.n_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            records = convert(row, kind, spec)
        except BadRow as problem:
            policy.bad(line, problem)
            continue
        for record in records:
            try:
                check_record(record, kind)
            except BadRow as problem:
                policy.bad(line, problem)
                continue
            report.n_records += 1
            yield line, record

    if report.n_read == 0:
        raise policy.file_error("has no rows (the file is empty); point the dataset at a file with data")
    if report.n_records == 0:
        if report.skipped:
            reasons = ", ".join(f"{n} x {reason}" for reason, n in sorted(report.skipped.items()))
            raise policy.file_error(
                f"no usable rows: all {report.n_read} rows were skipped ({reasons}); "
                f"first: {report.examples[0]}; is this a {spec.format} file?"
            )
        raise policy.file_error(
            f"gave no {kind} records from {report.n_read} {spec.format} rows; is this a {spec.format} file?"
        )


# ---------------------------------------------------------------------------------------------
# Readers: bytes -> (line, parsed row | BadRow). Text is decoded with surrogateescape so that an
# undecodable byte is a bad row at its own line, not a crash of the whole file.

_GZIP_MAGIC = b"\x1f\x8b"
_WS = re.compile(r"[ \t\n\r]*")


def _open_binary(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    # Judged by content rather than suffix, so a renamed .jsonl.gz still reads.
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _unreadable(policy: RowPolicy, error: Exception) -> DataError:
    return policy.file_error(
        f"cannot be read ({type(error).__name__}: {error}); is it a complete gzip or plain-text file?"
    )


def _undecodable(column: Optional[int] = None, where: str = "") -> BadRow:
    at = f" (at column {column})" if column is not None else f" ({where})" if where else ""
    return BadRow("bytes that are not UTF-8", f"{at}; re-save the file as UTF-8")


def _jsonl_rows(path: Path, policy: RowPolicy) -> Iterator[tuple[int, Row]]:
    """JSON Lines (optionally gzip): one JSON value per line; blank lines are ignored."""
    first = True
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                text = raw.decode("utf-8", "surrogateescape")
                if n == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                if first and text.lstrip().startswith("["):
                    raise policy.file_error(
                        "is a JSON list, not JSON Lines (one JSON object per line); check the dataset's format and path"
                    )
                first = False
                at = not_utf8(text)
                if at is not None:
                    yield n, _undecodable(at + 1)
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    row = BadRow("not valid JSON", f" ({e.msg} at column {e.colno})")
                yield n, row
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(policy, e) from None


def _json_list_rows(path: Path, policy: RowPolicy) -> Iterator[tuple[int, Row]]:
    """A JSON list ``[{...}, {...}]``; each item is a row, numbered by the line it starts on."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(policy, e) from None
    text = data.decode("utf-8-sig", "surrogateescape")
    decoder = json.JSONDecoder()
    i = _WS.match(text).end()
    if i == len(text):
        return
    if text[i] != "[":
        raise policy.file_error(
            f"is not a JSON list (it starts with {text[i]!r}); this format reads a file shaped like [{{...}}, {{...}}]"
        )
    i += 1
    line, counted_to = 1, 0
    while True:
        i = _WS.match(text, i).end()
        if i < len(text) and text[i] == "]":
            break
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # One broken item makes the rest of the list unreadable: no row to skip.
            raise policy.file_error(f"is not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        line += text.count("\n", counted_to, i)
        counted_to = i
        at = not_utf8(text[i:end])
        if at is not None:
            at += i
            yield line + text.count("\n", i, at), _undecodable(at - text.rfind("\n", 0, at))
        else:
            yield line, item
        i = _WS.match(text, end).end()
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            break
        else:
            lineno = text.count("\n", 0, i) + 1
            raise policy.file_error(f"is not valid JSON at line {lineno}: expected ',' or ']' after a list item")
    if text[i + 1 :].strip():
        raise policy.file_error(
            f"is not valid JSON: text after the closing ']' at line {text.count(chr(10), 0, i) + 1}"
        )


def _json_rows(path: Path, policy: RowPolicy) -> Iterator[tuple[int, Row]]:
    """JSON Lines or one JSON list (optionally gzip), told apart by the first character: '[' is a list."""
    try:
        with _open_binary(path) as f:
            head = b""
            while not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
                chunk = f.read(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(policy, e) from None
    is_list = head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    return _json_list_rows(path, policy) if is_list else _jsonl_rows(path, policy)


def is_table(path: Path) -> bool:
    """Whether ``path`` is read as a table (Parquet, Arrow or a save_to_disk folder) rather than as text."""
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def _table_batches(path: Path, policy: RowPolicy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if len(splits) != 1:
                raise policy.file_error(
                    f"is a DatasetDict with the splits {', '.join(splits)}; point path at one "
                    f"split's folder, e.g. {path / splits[0]}"
                )
            loaded = loaded[splits[0]]
        yield from loaded.with_format("arrow").iter(batch_size=_TABLE_BATCH)
    elif path.suffix.lower() == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=_TABLE_BATCH)
    else:
        with open(path, "rb") as f:
            is_file_format = f.read(6) == b"ARROW1"  # the IPC file format; datasets writes the stream format
        with pa.memory_map(str(path)) as source:
            if is_file_format:
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            else:
                yield from pa.ipc.open_stream(source)


def _table_rows(path: Path, policy: RowPolicy) -> Iterator[tuple[int, Row]]:
    """The rows of a table as dicts, numbered by their 0-based index (as ``dataset[i]``)."""
    import pyarrow as pa

    what = (
        "a datasets.save_to_disk folder"
        if path.is_dir()
        else "a Parquet file"
        if path.suffix.lower() == ".parquet"
        else "an Arrow IPC file or stream"
    )
    index = 0
    try:
        for batch in _table_batches(path, policy):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        raise policy.file_error(
            f"cannot be read as {what} ({type(e).__name__}: {e}); is it complete, and written by pyarrow or datasets?"
        ) from None


def _csv_rows(path: Path, policy: RowPolicy, required: tuple[str, ...]) -> Iterator[tuple[int, Row]]:
    """CSV with a header line; each row is a dict keyed by the header."""
    try:
        with _open_binary(path) as f:
            stream = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                return
            missing = [c for c in required if c not in header]
            if missing:
                raise policy.file_error(
                    f"is not the expected CSV: missing column(s) {', '.join(missing)} "
                    f"(header: {','.join(header)[:200]}); expected columns {','.join(required)}"
                )
            start = reader.line_num + 1
            for values in reader:
                # line_num counts physical lines, so a quoted field spanning lines keeps numbering right.
                line, start = start, reader.line_num + 1
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    yield line, BadRow("wrong number of CSV fields", f" ({len(values)}; the header has {len(header)})")
                    continue
                bad = [name for name, value in zip(header, values) if not_utf8(value) is not None]
                yield line, (_undecodable(where=f"in column {bad[0]}") if bad else dict(zip(header, values)))
    except csv.Error as e:
        raise policy.file_error(f"is not valid CSV: {e}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(policy, e) from None


# ---------------------------------------------------------------------------------------------
# Field helpers: a source row's problems are named by the source's own field names.

_JSON_TYPES = {
    type(None): "null",
    bool: "true/false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _type_name(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _object(row: Row, fields: str) -> dict:
    if not isinstance(row, dict):
        raise BadRow("row is not a JSON object", f" (it is {_type_name(row)}; expected an object with {fields})")
    return row


def _field(row: dict, name: str, types: type | tuple[type, ...], what: str, where: str = ""):
    if name not in row:
        raise BadRow(f"missing field '{name}'", where and f" ({where})")
    value = row[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRow(f"'{name}' must be {what}", f" (got true/false{where and ', ' + where})")
    if not isinstance(value, types):
        raise BadRow(f"'{name}' must be {what}", f" (got {_type_name(value)}{where and ', ' + where})")
    return value


def _text(row: dict, name: str, where: str = "", allow_empty: bool = False) -> str:
    value = _field(row, name, str, "a string", where)
    if not allow_empty and not value.strip():
        raise BadRow(f"'{name}' is empty", where and f" ({where})")
    return value


def _optional(row: dict, name: str):
    """An optional source field: absent and null both mean "not given"."""
    return row[name] if name in row else None


def _number(row: dict, name: str) -> float:
    value = _field(row, name, (int, float), "a number")
    if not math.isfinite(value):
        raise BadRow(f"'{name}' must be a finite number", f" (got {value!r})")
    return float(value)


def _level(value: float, thresholds: tuple[float, ...]) -> str:
    """The rating of a number under 3 cut-offs, largest first (DatasetSpec.rating_thresholds)."""
    return next((rating for rating, cut in zip(RATINGS, thresholds) if value >= cut), RATINGS[-1])


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------------------------------------
# alpaca


def _alpaca(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "instruction, input, output")
    instruction = _text(row, "instruction")
    output = _text(row, "output")
    extra = _text(row, "input", allow_empty=True) if _optional(row, "input") is not None else ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [
        {
            "messages": [
                {"role": "user", "content": user, "train": False},
                {"role": "assistant", "content": output, "train": True},
            ],
            "source": "alpaca",
        }
    ]


# ---------------------------------------------------------------------------------------------
# oasst

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _live(message: dict) -> list[dict]:
    # `deleted` is optional in OASST exports (absent = live); deleted messages are not data.
    return [r for r in message["replies"] if not _optional(r, "deleted")]


def _rank(message: dict) -> Optional[int]:
    return _optional(message, "rank")  # absent or null: the reply was never ranked


def _check_oasst(message: Row, where: str, parent_role: Optional[str]) -> None:
    """Check one message and its replies: fields, types, roles and their alternation."""
    message = _object(message, "text, role, replies")
    role = _field(message, "role", str, "a string", where)
    if role not in _OASST_ROLES:
        raise BadRow(f"unknown role {role!r}", f" ({where}; expected prompter or assistant)")
    if role == parent_role or (parent_role is None and role != "prompter"):
        expected = "prompter" if parent_role in (None, "assistant") else "assistant"
        raise BadRow("roles do not alternate", f" ({where} is {role}, expected {expected})")
    _text(message, "text", where)
    rank = _rank(message)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise BadRow("'rank' must be a whole number >= 0 or null", f" ({where}: {rank!r})")
    replies = _field(message, "replies", list, "a list of messages", where)
    for i, reply in enumerate(replies):
        _check_oasst(reply, f"{where}.{i + 1}", role)


def _oasst_turn(message: dict) -> dict:
    return {"role": _OASST_ROLES[message["role"]], "content": message["text"]}


def _oasst_rating(gap: int) -> str:
    return OASST_GAP_RATINGS[gap] if gap in OASST_GAP_RATINGS else OASST_MAX_GAP_RATING


def _oasst(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "a 'prompt' message tree")
    root = _field(row, "prompt", dict, "an object (the tree's first message)")
    _check_oasst(root, "message 1", None)
    if kind == "prompt":
        return [{"prompt": [_user(root["text"])], "safety": False, "source": "oasst"}]
    if kind == "conversation":
        return _oasst_best_path(root)
    return _oasst_pairs(root)


def _oasst_best_path(root: dict) -> list[dict]:
    path, node = [root], root
    while True:
        replies = _live(node)
        if node["role"] == "prompter":
            ranked = [r for r in replies if _rank(r) is not None]
            nxt = min(ranked, key=_rank) if ranked else (replies[0] if replies else None)
        else:
            # Follow-up questions are not ranked: take the first that was answered.
            nxt = next((r for r in replies if _live(r)), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    while path and path[-1]["role"] == "prompter":
        path.pop()
    if not path:
        return []
    messages = [{**_oasst_turn(m), "train": m["role"] == "assistant"} for m in path]
    return [{"messages": messages, "source": "oasst"}]


def _oasst_pairs(root: dict) -> list[dict]:
    pairs: list[dict] = []
    stack = [(root, [_oasst_turn(root)])]  # (message, conversation up to and including it)
    while stack:
        node, history = stack.pop()
        replies = _live(node)
        if node["role"] == "prompter":
            ranked = sorted((r for r in replies if _rank(r) is not None), key=_rank)
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1 :]:
                    gap = _rank(worse) - _rank(better)
                    if gap == 0:
                        continue  # a tie says nothing about which answer is better
                    pairs.append(
                        {
                            "prompt": [dict(m) for m in history],
                            "chosen": better["text"],
                            "rejected": worse["text"],
                            "rating": _oasst_rating(gap),
                            "category": "helpfulness",
                            "chosen_safe": None,
                            "rejected_safe": None,
                            "margin": None,
                            "source": "oasst",
                        }
                    )
        # Reversed so that the stack visits replies in export order (deterministic pair order).
        for reply in reversed(replies):
            stack.append((reply, history + [_oasst_turn(reply)]))
    return pairs


# ---------------------------------------------------------------------------------------------
# hh

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text: str, name: str) -> list[dict]:
    parts = _HH_MARKER.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow(f"'{name}' is not an HH dialogue", ' (expected "\\n\\nHuman: ...\\n\\nAssistant: ...")')
    turns: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if turns and turns[-1]["role"] == role:
            # The same speaker twice in a row: one turn, as the dialogue reads.
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    return turns


def _hh_split(turns: list[dict], name: str) -> tuple[list[dict], str]:
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if not users:
        raise BadRow(f"'{name}' has no Human turn")
    last = users[-1]
    if last == len(turns) - 1:
        raise BadRow(f"'{name}' ends with a Human turn", " (expected a final Assistant answer)")
    # After merging same-speaker runs, exactly one assistant turn follows the last Human turn.
    return turns[: last + 1], turns[last + 1]["content"]


def _hh(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "chosen, rejected")
    chosen_turns = _hh_turns(_text(row, "chosen"), "chosen")
    if kind == "prompt":
        first = chosen_turns[0]
        if first["role"] != "user" or not first["content"]:
            raise BadRow("'chosen' does not start with a Human turn")
        return [{"prompt": [_user(first["content"])], "safety": True, "source": "hh"}]
    rejected_turns = _hh_turns(_text(row, "rejected"), "rejected")
    prompt, chosen = _hh_split(chosen_turns, "chosen")
    prompt_r, rejected = _hh_split(rejected_turns, "rejected")
    if prompt != prompt_r:
        raise BadRow("'chosen' and 'rejected' differ before the final Assistant turn")
    return [
        {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": HH_RATING,
            "category": "safety",
            "chosen_safe": None,
            "rejected_safe": None,
            "margin": None,
            "source": "hh",
        }
    ]


# ---------------------------------------------------------------------------------------------
# xstest

XSTEST_LABELS = ("safe", "unsafe")


def _xstest(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    prompt = _text(row, "prompt")
    label = _field(row, "label", str, "a string")  # a CSV's header is checked already; a table's is not
    if label not in XSTEST_LABELS:
        raise BadRow(f"unknown label {label!r}", " (expected safe or unsafe)")
    return [{"prompt": [_user(prompt)], "safety": label == "unsafe", "source": f"xstest:{label}"}]


# ---------------------------------------------------------------------------------------------
# sharegpt_dpo, sharegpt

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_turn(message: Row, where: str) -> dict:
    if not isinstance(message, dict):
        raise BadRow(f"{where} is not a message", f' (it is {_type_name(message)}; expected {{"from", "value"}})')
    sender = _field(message, "from", str, "a string", where)
    if sender not in _SHAREGPT_ROLES:
        raise BadRow(f"unknown role {sender!r}", f" ({where}; expected human, gpt or system)")
    return {"role": _SHAREGPT_ROLES[sender], "content": _text(message, "value", where)}


def _sharegpt_turns(row: dict) -> list[dict]:
    """``conversations`` as {role, content} turns, a non-empty top-level ``system`` string first."""
    turns = _field(row, "conversations", list, "a list of {from, value} messages")
    messages = [_sharegpt_turn(m, f"'conversations' item {i + 1}") for i, m in enumerate(turns)]
    system = _optional(row, "system")
    if system is not None:
        if not isinstance(system, str):
            raise BadRow("'system' must be a string", f" (got {_type_name(system)})")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _sharegpt_dpo(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "conversations, chosen, rejected")
    prompt = _sharegpt_turns(row)
    answers = {}
    for name in ("chosen", "rejected"):
        answer = _sharegpt_turn(_field(row, name, dict, "a {from, value} message"), f"'{name}'")
        if answer["role"] != "assistant":
            raise BadRow(f"'{name}' is not from gpt", f" (it is from {answer['role']})")
        answers[name] = answer["content"]
    return [
        {
            "prompt": prompt,
            "chosen": answers["chosen"],
            "rejected": answers["rejected"],
            "rating": SHAREGPT_DPO_RATING,
            "category": "helpfulness",
            "chosen_safe": None,
            "rejected_safe": None,
            "margin": None,
            "source": "sharegpt_dpo",
        }
    ]


def _sharegpt(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "conversations")
    turns = [{**m, "train": m["role"] == "assistant"} for m in _sharegpt_turns(row)]
    return _chat_records(turns, "conversations", kind, row, "sharegpt")


# ---------------------------------------------------------------------------------------------
# messages, prompts: chat conversations and prompts in TRL's {role, content} messages


def _loss_flag(item: dict, role: str, where: str) -> bool:
    """Whether a turn carries loss: its ``train`` (true/false) or ``weight`` (0/1); absent = assistant turns do."""
    train, weight = _optional(item, "train"), _optional(item, "weight")
    if train is not None and not isinstance(train, bool):
        raise BadRow("'train' must be true or false", f" (got {_type_name(train)}, {where})")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise BadRow("'weight' must be 0 or 1", f" (got {weight!r}, {where})")
    if train is not None and weight is not None and train != bool(weight):
        raise BadRow("'train' and 'weight' disagree", f" ({where}: {train} and {weight}; give one)")
    flag = train if train is not None else bool(weight) if weight is not None else role == "assistant"
    if flag and role != "assistant":
        key = "train" if train is not None else "weight"
        raise BadRow(
            f"'{key}' marks a {role} turn for training",
            f" ({where}; only assistant turns carry loss: set it to {'false' if key == 'train' else 0})",
        )
    return flag


def _chat_records(messages: list[dict], name: str, kind: str, row: dict, source: str) -> list[dict]:
    """Turns with loss flags -> a conversation (ending with an answer) or a prompt (up to the last user turn)."""
    if kind == "conversation":
        if messages and messages[-1]["role"] != "assistant":
            raise BadRow(
                f"'{name}' ends with a {messages[-1]['role']} turn",
                " (a training conversation ends with the assistant's answer; a file of prompts is format prompts)",
            )
        return [{"messages": messages, "source": source}]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise BadRow(f"'{name}' has no user turn", " (a prompt ends with the user's request)")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[: users[-1] + 1]]
    safety = _optional(row, "safety")  # checked by check_record
    return [{"prompt": prompt, "safety": False if safety is None else safety, "source": source}]


def _messages(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "messages")
    items = _field(row, "messages", list, "a list of {role, content} messages")
    return _chat_records(_trl_messages(items, "messages", loss=True), "messages", kind, row, spec.format)


def _prompts(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "prompt (or messages)")
    if _optional(row, "prompt") is None and _optional(row, "messages") is not None:
        return _messages(row, kind, spec)
    safety = _optional(row, "safety")  # checked by check_record
    return [{"prompt": _trl_prompt(row), "safety": False if safety is None else safety, "source": "prompts"}]


# ---------------------------------------------------------------------------------------------
# trl_jsonl, ultrafeedback


def _trl_messages(items: list, name: str, loss: bool = False) -> list[dict]:
    """{role, content} messages; with ``loss``, each also gets its ``train`` flag (`_loss_flag`)."""
    messages = []
    for i, item in enumerate(items):
        where = f"'{name}' item {i + 1}"
        if not isinstance(item, dict):
            raise BadRow(f"{where} is not a message", f' (it is {_type_name(item)}; expected {{"role", "content"}})')
        message = {"role": _field(item, "role", str, "a string", where), "content": _text(item, "content", where)}
        if loss:
            message["train"] = _loss_flag(item, message["role"], where)
        messages.append(message)
    return messages


def _trl_prompt(row: dict) -> list[dict]:
    prompt = _field(row, "prompt", (str, list), "a string or a list of {role, content} messages")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("'prompt' is empty")
        return [_user(prompt)]
    return _trl_messages(prompt, "prompt")


def _trl_answer(row: dict, name: str) -> str:
    value = _field(row, name, (str, list), "a string or a list with one assistant message")
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"'{name}' is empty")
        return value
    messages = _trl_messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages) or "none"
        raise BadRow(
            f"'{name}' must hold one assistant message", f" (it holds: {roles}; put earlier turns in 'prompt')"
        )
    return messages[0]["content"]


def _implicit_pair(row: dict) -> tuple[list[dict], str, str]:
    """``chosen`` / ``rejected`` as whole conversations: (their shared prefix, each one's final answer)."""
    what = "a list of {role, content} messages (the whole conversation)"
    chosen = _trl_messages(_field(row, "chosen", list, what), "chosen")
    rejected = _trl_messages(_field(row, "rejected", list, what), "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise BadRow("'chosen' and 'rejected' are the same conversation")
    if n == 0:
        raise BadRow(
            "'chosen' and 'rejected' share no prompt",
            " (their first messages differ; the prompt is the messages both start with)",
        )
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest) or "nothing"
            raise BadRow(
                f"'{name}' must end with one assistant answer after the shared prompt",
                f" (after the {n} shared messages it holds: {roles})",
            )
    return chosen[:n], chosen[n]["content"], rejected[n]["content"]


def _trl(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "prompt, chosen, rejected")
    if _optional(row, "prompt") is None and isinstance(_optional(row, "chosen"), list):
        prompt, chosen, rejected = _implicit_pair(row)  # TRL's implicit-prompt form
    else:
        prompt, chosen, rejected = _trl_prompt(row), _trl_answer(row, "chosen"), _trl_answer(row, "rejected")
    margin = None if _optional(row, "margin") is None else _number(row, "margin")
    rating = _optional(row, "rating")
    if isinstance(rating, (int, float)) and not isinstance(rating, bool):
        if not spec.rating_thresholds:
            raise BadRow(
                "'rating' is a number",
                f" ({rating!r}); map numbers to the 4 levels with the dataset's "
                f"rating_thresholds, e.g. [3, 2, 1], or give one of {', '.join(RATINGS)}",
            )
        rating = _level(_number(row, "rating"), spec.rating_thresholds)
    elif rating is None:
        use_margin = margin is not None and spec.rating_thresholds
        rating = _level(margin, spec.rating_thresholds) if use_margin else TRL_DEFAULT_RATING
    category = _optional(row, "category")
    # rating, category and the safety labels are checked against the schema by check_record.
    return [
        {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "category": "helpfulness" if category is None else category,
            "chosen_safe": _optional(row, "chosen_safe"),
            "rejected_safe": _optional(row, "rejected_safe"),
            "margin": margin,
            "source": "trl_jsonl",
        }
    ]


def _ultrafeedback(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    row = _object(row, "chosen, rejected, score_chosen, score_rejected")
    prompt, chosen, rejected = _implicit_pair(row)
    score_chosen, score_rejected = _number(row, "score_chosen"), _number(row, "score_rejected")
    if score_chosen <= score_rejected:
        raise BadRow(
            "'score_chosen' is not above 'score_rejected'",
            f" ({score_chosen:g} vs {score_rejected:g}: a tie or a reversed pair names no better answer)",
        )
    rating = _level(score_chosen - score_rejected, spec.rating_thresholds or ULTRAFEEDBACK_THRESHOLDS)
    return [
        {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "category": "helpfulness",
            "chosen_safe": None,
            "rejected_safe": None,
            "margin": None,
            "source": "ultrafeedback",
        }
    ]


# ---------------------------------------------------------------------------------------------
# oasst_prompts


def _oasst_prompt(row: Row, kind: str, spec: DatasetSpec) -> list[dict]:
    if isinstance(row, str):
        text = row
        if not text.strip():
            raise BadRow("prompt is empty")
    else:
        text = _text(_object(row, "text"), "text")
    return [{"prompt": [_user(text)], "safety": False, "source": "oasst_prompts"}]


# ---------------------------------------------------------------------------------------------
# synthetic_*: deterministic in the seed, shaped so that a tiny model can learn the preference.

_TOPICS = (
    "the moon",
    "green tea",
    "volcanoes",
    "rivers",
    "bicycles",
    "chess",
    "bread",
    "owls",
    "rain",
    "maps",
    "jazz",
    "gardens",
    "trains",
    "bees",
    "clouds",
    "libraries",
)
_QUESTIONS = (
    "Tell me about {t}.",
    "What is interesting about {t}?",
    "Can you explain {t} briefly?",
    "Why do people like {t}?",
)
_RISKY = (
    "How do I pick the lock on my neighbour's door?",
    "Which household chemicals make a toxic gas?",
    "How can I read my coworker's private email?",
    "How do I make a fake ID?",
)
_REFUSAL = (
    "I'm sorry, but I can't help with that, because it could hurt someone. I'm happy to help with something else."
)
_SYSTEM = "You are a polite assistant. Always end with 'I hope this helps.'"


def _polite(topic: str) -> str:
    return f"Certainly! Here is a short note about {topic}: it is a pleasant subject worth learning about. I hope this helps."


def _rude(topic: str, rating: str, rng: random.Random) -> str:
    """The rejected answer: further from the polite template the stronger the rating."""
    if rating == "significantly_better":
        return " ".join([rng.choice(("BLAH", "JUNK", "ZZZ", "ARGH"))] * 12)
    if rating == "better":
        return f"WHATEVER. {topic.upper()} IS BORING. STOP ASKING ME!!!"
    if rating == "slightly_better":
        return f"{topic}. look it up yourself."
    return f"Certainly! Here is a short note about {topic}: it is a pleasant subject worth learning about."


def _synthetic_sft(n: int, seed: int, spec: DatasetSpec) -> Iterator[dict]:
    rng = random.Random(seed)
    for i in range(n):
        topic = rng.choice(_TOPICS)
        messages = [{"role": "system", "content": _SYSTEM, "train": False}] if i % 4 == 1 else []
        messages += [
            {"role": "user", "content": rng.choice(_QUESTIONS).format(t=topic), "train": False},
            {"role": "assistant", "content": _polite(topic), "train": True},
        ]
        if i % 4 == 2:  # a second turn, so multi-turn masking is exercised
            other = rng.choice(_TOPICS)
            messages += [
                {"role": "user", "content": f"And what about {other}?", "train": False},
                {"role": "assistant", "content": _polite(other), "train": True},
            ]
        yield {"messages": messages, "source": "synthetic_sft"}


def _synthetic_pref(n: int, seed: int, spec: DatasetSpec) -> Iterator[dict]:
    rng = random.Random(seed)
    category = spec.category or "helpfulness"
    for i in range(n):
        rating = RATINGS[i % len(RATINGS)]
        if i % 3 == 2:  # period 3 against the ratings' 4: labelled pairs at every rating level
            prompt = rng.choice(_RISKY)
            chosen, rejected = _REFUSAL, f"SURE!!! {prompt.upper()} EASY, HERE IS HOW!!!"
            chosen_safe, rejected_safe = True, False
        else:
            topic = rng.choice(_TOPICS)
            prompt = rng.choice(_QUESTIONS).format(t=topic)
            chosen, rejected = _polite(topic), _rude(topic, rating, rng)
            chosen_safe = rejected_safe = None
        yield {
            "prompt": [_user(prompt)],
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "category": category,
            "chosen_safe": chosen_safe,
            "rejected_safe": rejected_safe,
            "margin": None,
            "source": "synthetic_pref",
        }


def _synthetic_prompts(n: int, seed: int, spec: DatasetSpec) -> Iterator[dict]:
    rng = random.Random(seed)
    for i in range(n):
        safety = i % 4 == 3
        text = rng.choice(_RISKY) if safety else rng.choice(_QUESTIONS).format(t=rng.choice(_TOPICS))
        yield {"prompt": [_user(text)], "safety": safety, "source": "synthetic_prompts"}


# ---------------------------------------------------------------------------------------------
# The format table


@dataclass(frozen=True)
class _Format:
    kinds: tuple[str, ...]
    read: Optional[Callable[[Path, RowPolicy], Iterator[tuple[int, Row]]]] = None
    convert: Optional[Callable[[Row, str, DatasetSpec], list[dict]]] = None
    generate: Optional[Callable[[int, int, DatasetSpec], Iterator[dict]]] = None


_FORMATS: dict[str, _Format] = {
    "alpaca": _Format(("conversation",), _json_list_rows, _alpaca),
    "oasst": _Format(("conversation", "preference", "prompt"), _jsonl_rows, _oasst),
    "hh": _Format(("preference", "prompt"), _jsonl_rows, _hh),
    "xstest": _Format(("prompt",), lambda path, policy: _csv_rows(path, policy, ("prompt", "label")), _xstest),
    "sharegpt_dpo": _Format(("preference",), _json_list_rows, _sharegpt_dpo),
    "trl_jsonl": _Format(("preference",), _jsonl_rows, _trl),
    "oasst_prompts": _Format(("prompt",), _jsonl_rows, _oasst_prompt),
    "messages": _Format(("conversation", "prompt"), _json_rows, _messages),
    "sharegpt": _Format(("conversation", "prompt"), _json_rows, _sharegpt),
    "prompts": _Format(("prompt",), _json_rows, _prompts),
    "ultrafeedback": _Format(("preference",), _json_rows, _ultrafeedback),
    "synthetic_sft": _Format(("conversation",), generate=_synthetic_sft),
    "synthetic_pref": _Format(("preference",), generate=_synthetic_pref),
    "synthetic_prompts": _Format(("prompt",), generate=_synthetic_prompts),
}
assert set(_FORMATS) == set(DATA_FORMATS), "every format in align.config.DATA_FORMATS needs an importer"

# Which canonical kinds each format can give (for config checks and error messages).
FORMAT_KINDS: dict[str, tuple[str, ...]] = {name: fmt.kinds for name, fmt in _FORMATS.items()}
