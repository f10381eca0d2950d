"""Bad rows and bad files: each problem is a DataError naming the file and line; skip mode counts them."""

from __future__ import annotations

import gzip
import json

import pytest

from align.config import DatasetSpec
from align.data.importers import iter_records
from align.data.validate import BadRow, DataError, DataReport, RowPolicy, check_record

GOOD = {"prompt": "q", "chosen": "yes", "rejected": "no"}


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw bytes (written as they are)."""
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def load(format, path, kind="preference", bad_rows="fail"):
    report = DataReport(path=str(path), format=format, kind=kind)
    records = [
        r for _, r in iter_records(DatasetSpec(format=format, path=str(path)), kind, path, RowPolicy(report, bad_rows))
    ]
    return records, report


# One bad row on line 3 of a TRL file, for every row-level problem; the message names file,
# line, problem and fix.
ROW_PROBLEMS = [
    ({"prompt": "q", "chosen": "", "rejected": "no"}, r"'chosen' is empty"),
    ({"prompt": "q", "rejected": "no"}, r"missing field 'chosen'"),
    (
        {"prompt": "q", "chosen": 7, "rejected": "no"},
        r"'chosen' must be a string or a list with one assistant message \(got a number\)",
    ),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"'chosen' and 'rejected' are the same text"),
    ({**GOOD, "rating": "much_better"}, r"unknown rating 'much_better' \(expected one of significantly_better, better"),
    ({**GOOD, "prompt": [{"role": "bot", "content": "q"}]}, r"unknown role 'bot' in 'prompt' item 1"),
    (
        {**GOOD, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        r"'prompt' must end with a user turn",
    ),
    ({**GOOD, "margin": "big"}, r"'margin' must be a number \(got a string\)"),
    ({**GOOD, "chosen_safe": "yes"}, r"'chosen_safe' must be true or false or null"),
    ({**GOOD, "category": "honesty"}, r"unknown category 'honesty'"),
    (["not", "an", "object"], r"row is not a JSON object \(it is a list"),
    (b'{"prompt": "q", "chosen": "yes", ', r"not valid JSON \(.* at column"),
    (
        b'{"prompt": "q", "chosen": "caf\xe9", "rejected": "no"}',
        r"bytes that are not UTF-8 \(at column 31\); re-save the file as UTF-8",
    ),
]


@pytest.mark.parametrize(
    "bad, problem", ROW_PROBLEMS, ids=[p.split(" ")[0].strip("'\\") + str(i) for i, (_, p) in enumerate(ROW_PROBLEMS)]
)
def test_row_problem_fails_with_file_line_and_fix(tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"^{path}.* line 3: {problem}.*; fix the row or set data.bad_rows: skip$"):
        load("trl_jsonl", path)


def test_skip_counts_bad_rows_by_reason(tmp_path):
    rows = [
        GOOD,
        ROW_PROBLEMS[0][0],
        GOOD,
        ROW_PROBLEMS[0][0],
        b"{oops",
        ROW_PROBLEMS[3][0],
        b"",
        b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}',
        GOOD,
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    records, report = load("trl_jsonl", path, bad_rows="skip")
    assert len(records) == report.n_records == 3
    assert report.n_read == 8  # the blank line 7 is not a row
    assert report.skipped == {
        "'chosen' is empty": 2,
        "not valid JSON": 1,
        "'chosen' and 'rejected' are the same text": 1,
        "bytes that are not UTF-8": 1,
    }
    assert report.n_skipped == 5
    assert report.examples[:3] == [
        "line 2: 'chosen' is empty",
        "line 4: 'chosen' is empty",
        "line 5: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
    ]
    assert report.examples[4].startswith("line 8: bytes that are not UTF-8")
    assert "skipped 5" in report.summary()


def test_a_bad_first_row_hints_at_the_wrong_format(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]), encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"line 1: missing field 'conversations'; fix the row or set data.bad_rows: skip "
        r"\(if every row looks like this, this is not a sharegpt_dpo file: check format and path\)",
    ):
        load("sharegpt_dpo", path)


def test_every_row_skipped_is_still_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q"}, {"question": "r"}])
    with pytest.raises(
        DataError,
        match=r"no usable rows: all 2 rows were skipped \(2 x missing field 'prompt'\); "
        r"first: line 1: missing field 'prompt'",
    ):
        load("trl_jsonl", path, bad_rows="skip")


@pytest.mark.parametrize(
    "format, kind", [("trl_jsonl", "preference"), ("alpaca", "conversation"), ("xstest", "prompt")]
)
def test_empty_file(tmp_path, format, kind):
    path = tmp_path / "empty.data"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{path}: has no rows \(the file is empty\)"):
        load(format, path, kind)


def test_json_list_given_to_a_json_lines_format(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=r"is a JSON list, not JSON Lines"):
        load("trl_jsonl", path, bad_rows="skip")


def test_json_lines_given_to_a_json_list_format(tmp_path):
    path = write_jsonl(tmp_path / "demos.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"demos.json: is not a JSON list \(it starts with '\{'\)"):
        load("alpaca", path, "conversation", bad_rows="skip")


def test_broken_json_list_names_the_line(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text(
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"demos.json: is not valid JSON at line 3, column 22"):
        load("alpaca", path, "conversation", bad_rows="skip")


def test_json_list_bad_item_and_undecodable_bytes_name_their_lines(tmp_path):
    path = tmp_path / "demos.json"
    path.write_bytes(
        b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "a",\n  "output": ""},\n'
        b' {"instruction": "a",\n  "output": "caf\xe9"}\n]\n'
    )
    with pytest.raises(DataError, match=r"demos.json line 3: 'output' is empty"):
        load("alpaca", path, "conversation")
    records, report = load("alpaca", path, "conversation", bad_rows="skip")
    assert len(records) == 1
    assert report.examples == [
        "line 3: 'output' is empty",
        "line 6: bytes that are not UTF-8 (at column 17); re-save the file as UTF-8",
    ]


def test_csv_without_the_expected_columns(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,question\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.csv: is not the expected CSV: missing column\(s\) prompt, label"):
        load("xstest", path, "prompt")


def test_csv_bad_rows(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_bytes(b'prompt,label\nhello,safe\n"multi\nline",unsafe\nhi,maybe\nonly-one-field\ncaf\xe9,safe\n')
    with pytest.raises(DataError, match=r"prompts.csv line 5: unknown label 'maybe' \(expected safe or unsafe\)"):
        load("xstest", path, "prompt")
    records, report = load("xstest", path, "prompt", bad_rows="skip")
    assert [r["prompt"][0]["content"] for r in records] == ["hello", "multi\nline"]
    assert report.examples == [
        "line 5: unknown label 'maybe' (expected safe or unsafe)",
        "line 6: wrong number of CSV fields (1; the header has 2)",
        "line 7: bytes that are not UTF-8 (in column prompt); re-save the file as UTF-8",
    ]


def test_unknown_sharegpt_role(tmp_path):
    path = tmp_path / "dpo.json"
    row = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}],
        "chosen": {"from": "gpt", "value": "a"},
        "rejected": {"from": "gpt", "value": "b"},
    }
    path.write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"dpo.json line 1: unknown role 'tool' \('conversations' item 2; expected human, gpt or system\)",
    ):
        load("sharegpt_dpo", path)


def test_truncated_gzip_is_a_file_error(tmp_path):
    data = gzip.compress(b"\n".join(json.dumps(GOOD).encode() for _ in range(200)))
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"pairs.jsonl.gz: cannot be read \(EOFError"):
        load("trl_jsonl", path, bad_rows="skip")


def test_gzip_is_read_by_content(tmp_path):
    path = tmp_path / "pairs.jsonl"  # no .gz suffix
    path.write_bytes(gzip.compress(json.dumps(GOOD).encode() + b"\n"))
    records, _ = load("trl_jsonl", path)
    assert records[0]["chosen"] == "yes"


def test_unknown_bad_rows_policy():
    with pytest.raises(ValueError, match="'fail' or 'skip'"):
        RowPolicy(DataReport(path="x", format="hh", kind="preference"), "ignore")


# --- check_record on canonical records ----------------------------------------------------------

PAIR = {
    "prompt": [{"role": "user", "content": "q"}],
    "chosen": "a",
    "rejected": "b",
    "rating": "better",
    "category": "helpfulness",
    "chosen_safe": None,
    "rejected_safe": None,
    "margin": None,
    "source": "t",
}


def test_check_record_accepts_a_valid_record_of_each_kind():
    check_record(PAIR, "preference")
    check_record({"prompt": [{"role": "user", "content": "q"}], "safety": True, "source": "t"}, "prompt")
    check_record(
        {
            "messages": [
                {"role": "system", "content": "s", "train": False},
                {"role": "user", "content": "q", "train": False},
                {"role": "assistant", "content": "a", "train": True},
            ],
            "source": "t",
        },
        "conversation",
    )


@pytest.mark.parametrize(
    "record, kind, problem",
    [
        ({**PAIR, "extra": 1}, "preference", "record has fields"),
        ({**PAIR, "margin": float("nan")}, "preference", "'margin' must be a finite number"),
        ({**PAIR, "chosen": "caf\udce9"}, "preference", "text is not valid UTF-8"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "train": True},
                    {"role": "assistant", "content": "a", "train": True},
                ],
                "source": "t",
            },
            "conversation",
            "'train' is true on a user turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "train": False},
                    {"role": "assistant", "content": "a", "train": False},
                ],
                "source": "t",
            },
            "conversation",
            "no assistant turn to train on",
        ),
        (
            {"messages": [{"role": "user", "content": "q", "train": False}], "source": "t"},
            "conversation",
            "'messages' must end with an assistant turn",
        ),
        ({"prompt": [], "safety": True, "source": "t"}, "prompt", "'prompt' must be a non-empty list"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "safety": "yes", "source": "t"},
            "prompt",
            "'safety' must be true or false",
        ),
    ],
)
def test_check_record_rejects(record, kind, problem):
    with pytest.raises(BadRow, match=problem):
        check_record(record, kind)
