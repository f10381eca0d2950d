"""Bring your own data: the messages, sharegpt, prompts and ultrafeedback importers, trl_jsonl's
implicit prompt and rating rule, and every format read from Parquet, Arrow and save_to_disk tables."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pytest
from datasets import Dataset, DatasetDict

from align.config import DatasetSpec
from align.configlib import ConfigError, build
from align.data.importers import FORMAT_KINDS
from align.data.load import load_records, to_dataset
from align.data.schema import FEATURES
from align.data.validate import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(format, path, kind, bad_rows="fail", **spec_fields):
    return load_records(DatasetSpec(format=format, path=str(path), **spec_fields), kind, path.parent, bad_rows)


def msg(role, content, **flags):
    return {"role": role, "content": content, **flags}


CHAT = {
    "messages": [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "Hello!"),
        msg("user", "Bye"),
        msg("assistant", "Goodbye."),
    ]
}
PAIR = {
    "chosen": [msg("user", "Capital of France?"), msg("assistant", "Paris.")],
    "rejected": [msg("user", "Capital of France?"), msg("assistant", "Lyon.")],
}
UF = {**PAIR, "prompt": "Capital of France?", "score_chosen": 9.0, "score_rejected": 4.5}


def test_new_formats_are_registered_with_their_kinds():
    assert FORMAT_KINDS["messages"] == FORMAT_KINDS["sharegpt"] == ("conversation", "prompt")
    assert FORMAT_KINDS["prompts"] == ("prompt",)
    assert FORMAT_KINDS["ultrafeedback"] == ("preference",)


# --- messages ---------------------------------------------------------------------------------


def test_messages_conversations_keep_system_turns_and_loss_flags(tmp_path):
    flagged = {
        "messages": [
            msg("user", "a"),
            msg("assistant", "b", weight=0),
            msg("user", "c"),
            msg("assistant", "d", train=True),
            msg("user", "e"),
            msg("assistant", "f", weight=1),
        ]
    }
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, flagged])
    records, report = load("messages", path, "conversation")
    assert report.n_kept == 2
    assert records[0] == {
        "messages": [
            msg("system", "Be brief.", train=False),
            msg("user", "Hi", train=False),
            msg("assistant", "Hello!", train=True),
            msg("user", "Bye", train=False),
            msg("assistant", "Goodbye.", train=True),
        ],
        "source": "messages",
    }
    assert [m["train"] for m in records[1]["messages"]] == [False, False, False, True, False, True]
    assert to_dataset(records, "conversation").to_list() == records


def test_messages_as_prompts(tmp_path):
    asking = {"messages": [msg("system", "Be brief."), msg("user", "Why?")], "safety": True}
    path = write_jsonl(tmp_path / "chat.jsonl", [asking, CHAT])
    records, _ = load("messages", path, "prompt")
    assert records[0] == {
        "prompt": [msg("system", "Be brief."), msg("user", "Why?")],
        "safety": True,
        "source": "messages",
    }
    # A whole conversation gives the turns up to its last user turn (its last answer is dropped).
    assert records[1]["prompt"] == [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "Hello!"),
        msg("user", "Bye"),
    ]
    assert records[1]["safety"] is False


def test_messages_json_list_and_gzip_read_alike(tmp_path):
    listed = tmp_path / "chat.json"
    listed.write_text(json.dumps([CHAT, CHAT], indent=1), encoding="utf-8")
    zipped = tmp_path / "chat.jsonl.gz"
    zipped.write_bytes(gzip.compress((json.dumps(CHAT) + "\n").encode()))
    assert load("messages", listed, "conversation")[0] == load("messages", zipped, "conversation")[0] * 2
    assert load("messages", listed, "conversation")[1].n_read == 2


MESSAGES_BAD = [
    (
        "ends-with-user",
        {"messages": [msg("user", "Hi")]},
        r"'messages' ends with a user turn \(a training conversation ends with the assistant's answer; "
        r"a file of prompts is format prompts\)",
    ),
    (
        "unknown-role",
        {"messages": [msg("user", "Hi"), msg("tool", "x"), msg("assistant", "ok")]},
        r"unknown role 'tool' in 'messages' item 2 \(expected one of system, user, assistant\)",
    ),
    (
        "weight-not-0-1",
        {"messages": [msg("user", "Hi"), msg("assistant", "ok", weight=2)]},
        r"'weight' must be 0 or 1 \(got 2, 'messages' item 2\)",
    ),
    (
        "train-not-bool",
        {"messages": [msg("user", "Hi"), msg("assistant", "ok", train="yes")]},
        r"'train' must be true or false \(got a string",
    ),
    (
        "flags-disagree",
        {"messages": [msg("user", "Hi"), msg("assistant", "ok", train=True, weight=0)]},
        r"'train' and 'weight' disagree",
    ),
    (
        "user-trained",
        {"messages": [msg("user", "Hi", train=True), msg("assistant", "ok")]},
        r"'train' marks a user turn for training \('messages' item 1; only assistant turns carry loss",
    ),
    (
        "nothing-trained",
        {"messages": [msg("user", "Hi"), msg("assistant", "ok", weight=0)]},
        r"conversation has no assistant turn to train on",
    ),
    (
        "empty-content",
        {"messages": [msg("user", " "), msg("assistant", "ok")]},
        r"'content' is empty \('messages' item 1\)",
    ),
    ("not-a-list", {"messages": "Hi"}, r"'messages' must be a list of \{role, content\} messages \(got a string\)"),
    ("missing-messages", {"text": "Hi"}, r"missing field 'messages'"),
]


@pytest.mark.parametrize("row, expected", [c[1:] for c in MESSAGES_BAD], ids=[c[0] for c in MESSAGES_BAD])
def test_messages_bad_row_names_file_and_line(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, row])
    with pytest.raises(DataError, match=rf"chat.jsonl line 2: {expected}.*; fix the row or set data.bad_rows: skip"):
        load("messages", path, "conversation")


def test_messages_bad_rows_skipped_and_counted(tmp_path):
    rows = [CHAT, MESSAGES_BAD[0][1], CHAT, MESSAGES_BAD[0][1], MESSAGES_BAD[2][1], CHAT]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    records, report = load("messages", path, "conversation", bad_rows="skip")
    assert len(records) == report.n_kept == 3 and report.n_read == 6
    assert report.skipped == {"'messages' ends with a user turn": 2, "'weight' must be 0 or 1": 1}
    assert report.examples[0].startswith("line 2: 'messages' ends with a user turn")


def test_prompt_without_a_user_turn_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [msg("system", "Be brief.")]}])
    with pytest.raises(DataError, match=r"line 1: 'messages' has no user turn"):
        load("messages", path, "prompt")


# --- sharegpt ---------------------------------------------------------------------------------

SHAREGPT = {
    "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    "system": "Be brief.",
}


def test_sharegpt_conversations_and_prompts(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([SHAREGPT, {"conversations": [{"from": "human", "value": "Why?"}]}]), encoding="utf-8")
    records, report = load("sharegpt", path, "conversation", bad_rows="skip")
    assert records == [
        {
            "messages": [
                msg("system", "Be brief.", train=False),
                msg("user", "Hi", train=False),
                msg("assistant", "Hello!", train=True),
            ],
            "source": "sharegpt",
        }
    ]
    assert report.skipped == {"'conversations' ends with a user turn": 1}
    prompts, _ = load("sharegpt", path, "prompt")
    assert [p["prompt"] for p in prompts] == [[msg("system", "Be brief."), msg("user", "Hi")], [msg("user", "Why?")]]


@pytest.mark.parametrize(
    "row, expected",
    [
        (
            {"conversations": [{"from": "bot", "value": "x"}]},
            r"unknown role 'bot' \('conversations' item 1; expected human",
        ),
        ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]}, r"'value' is empty"),
        ({"messages": []}, r"missing field 'conversations'"),
        ({**SHAREGPT, "system": 3}, r"'system' must be a string \(got a number\)"),
    ],
)
def test_sharegpt_bad_rows(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT, row])
    with pytest.raises(DataError, match=rf"sharegpt.jsonl line 2: {expected}"):
        load("sharegpt", path, "conversation")


# --- prompts ----------------------------------------------------------------------------------


def test_prompts_take_strings_message_lists_and_messages(tmp_path):
    rows = [
        {"prompt": "Why is the sky blue?"},
        {"prompt": [msg("system", "Be brief."), msg("user", "Why?")], "safety": True},
        {"messages": [msg("user", "Tell me a joke.")]},
    ]
    records, _ = load("prompts", write_jsonl(tmp_path / "p.jsonl", rows), "prompt")
    assert records == [
        {"prompt": [msg("user", "Why is the sky blue?")], "safety": False, "source": "prompts"},
        {"prompt": [msg("system", "Be brief."), msg("user", "Why?")], "safety": True, "source": "prompts"},
        {"prompt": [msg("user", "Tell me a joke.")], "safety": False, "source": "prompts"},
    ]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": ""}, r"'prompt' is empty"),
        (
            {"prompt": [msg("user", "q"), msg("assistant", "a")]},
            r"'prompt' must end with a user turn \(it ends with assistant\)",
        ),
        ({"prompt": "q", "safety": "yes"}, r"'safety' must be true or false \(got 'yes'\)"),
        ({"question": "q"}, r"missing field 'prompt'"),
        ("q", r"row is not a JSON object"),
    ],
)
def test_prompts_bad_rows(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, row])
    with pytest.raises(DataError, match=rf"p.jsonl line 2: {expected}"):
        load("prompts", path, "prompt")


def test_prompts_format_gives_no_conversations(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}])
    with pytest.raises(DataError, match=r"'prompts' cannot give conversation records.*: .*messages"):
        load("prompts", path, "conversation")


# --- trl_jsonl: implicit prompt, rating rule ---------------------------------------------------


def test_trl_implicit_prompt_is_the_shared_prefix(tmp_path):
    deep = {
        "chosen": [
            msg("system", "S"),
            msg("user", "a"),
            msg("assistant", "b"),
            msg("user", "c"),
            msg("assistant", "good"),
        ],
        "rejected": [
            msg("system", "S"),
            msg("user", "a"),
            msg("assistant", "b"),
            msg("user", "c"),
            msg("assistant", "bad"),
        ],
    }
    records, _ = load("trl_jsonl", write_jsonl(tmp_path / "pairs.jsonl", [PAIR, deep]), "preference")
    assert records[0] == {
        "prompt": [msg("user", "Capital of France?")],
        "chosen": "Paris.",
        "rejected": "Lyon.",
        "rating": "better",
        "category": "helpfulness",
        "chosen_safe": None,
        "rejected_safe": None,
        "margin": None,
        "source": "trl_jsonl",
    }
    assert records[1]["prompt"] == deep["chosen"][:4]
    assert (records[1]["chosen"], records[1]["rejected"]) == ("good", "bad")


IMPLICIT_BAD = [
    (
        "no-shared-prefix",
        {"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "x"), msg("assistant", "y")]},
        r"'chosen' and 'rejected' share no prompt \(their first messages differ",
    ),
    (
        "final-turn-not-assistant",
        {
            "chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
            "rejected": [msg("user", "a"), msg("assistant", "b"), msg("user", "d")],
        },
        r"'chosen' must end with one assistant answer after the shared prompt \(after the 2 shared messages it "
        r"holds: user\)",
    ),
    (
        "several-turns-after-prefix",
        {
            "chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"), msg("assistant", "d")],
            "rejected": [msg("user", "a"), msg("assistant", "x")],
        },
        r"'chosen' must end with one assistant answer after the shared prompt \(after the 1 shared messages it "
        r"holds: assistant, user, assistant\)",
    ),
    (
        "same-conversation",
        {"chosen": PAIR["chosen"], "rejected": PAIR["chosen"]},
        r"'chosen' and 'rejected' are the same conversation",
    ),
    (
        "prefix-of-the-other",
        {"chosen": PAIR["chosen"], "rejected": PAIR["chosen"][:1]},
        r"'rejected' must end with one assistant answer after the shared prompt \(after the 1 shared messages it "
        r"holds: nothing\)",
    ),
    (
        "rejected-a-string",
        {"chosen": PAIR["chosen"], "rejected": "Lyon."},
        r"'rejected' must be a list of \{role, content\} messages \(the whole conversation\) \(got a string\)",
    ),
    ("string-answers-without-prompt", {"chosen": "Paris.", "rejected": "Lyon."}, r"missing field 'prompt'"),
]


@pytest.mark.parametrize("row, expected", [c[1:] for c in IMPLICIT_BAD], ids=[c[0] for c in IMPLICIT_BAD])
def test_trl_implicit_prompt_bad_rows(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, row])
    with pytest.raises(DataError, match=rf"pairs.jsonl line 2: {expected}"):
        load("trl_jsonl", path, "preference")


def test_trl_numeric_ratings_and_margins_follow_the_rating_thresholds(tmp_path):
    rows = [
        {**PAIR, "rating": 7},
        {**PAIR, "rating": 4.5},
        {**PAIR, "rating": 0},
        {**PAIR, "margin": 2.5},
        {**PAIR, "rating": "slightly_better", "margin": 9},
        PAIR,
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    records, _ = load("trl_jsonl", path, "preference", rating_thresholds=(6, 4, 2))
    assert [r["rating"] for r in records] == [
        "significantly_better",
        "better",
        "negligibly_better",
        "slightly_better",
        "slightly_better",
        "better",
    ]
    assert [r["margin"] for r in records] == [None, None, None, 2.5, 9.0, None]
    # Without a rule a numeric rating is a bad row that says how to map it; a margin alone keeps the default.
    with pytest.raises(
        DataError,
        match=r"line 1: 'rating' is a number \(7\); map numbers to the 4 levels with "
        r"the dataset's rating_thresholds",
    ):
        load("trl_jsonl", path, "preference")
    records, report = load("trl_jsonl", path, "preference", bad_rows="skip")
    assert report.skipped == {"'rating' is a number": 3} and records[0]["rating"] == "better"


# --- ultrafeedback ----------------------------------------------------------------------------


def test_ultrafeedback_score_gaps_map_to_ratings(tmp_path):
    gaps = [(9, 4.5), (8, 6), (7, 5.5), (7.5, 7), (10, 7)]
    rows = [{**UF, "score_chosen": c, "score_rejected": r} for c, r in gaps]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    records, _ = load("ultrafeedback", path, "preference")
    assert [r["rating"] for r in records] == [
        "significantly_better",
        "better",
        "slightly_better",
        "negligibly_better",
        "significantly_better",
    ]
    assert records[0] == {
        "prompt": [msg("user", "Capital of France?")],
        "chosen": "Paris.",
        "rejected": "Lyon.",
        "rating": "significantly_better",
        "category": "helpfulness",
        "chosen_safe": None,
        "rejected_safe": None,
        "margin": None,
        "source": "ultrafeedback",
    }
    custom, _ = load("ultrafeedback", path, "preference", rating_thresholds=(4, 2.5, 0.5))
    assert [r["rating"] for r in custom] == [
        "significantly_better",
        "slightly_better",
        "slightly_better",
        "slightly_better",
        "better",
    ]
    cat, _ = load("ultrafeedback", path, "preference", category="safety")
    assert {r["category"] for r in cat} == {"safety"}


@pytest.mark.parametrize(
    "row, expected",
    [
        ({**UF, "score_rejected": 9.0}, r"'score_chosen' is not above 'score_rejected' \(9 vs 9: a tie"),
        ({**UF, "score_chosen": 2}, r"'score_chosen' is not above 'score_rejected' \(2 vs 4.5"),
        ({**UF, "score_chosen": "high"}, r"'score_chosen' must be a number \(got a string\)"),
        ({k: v for k, v in UF.items() if k != "score_rejected"}, r"missing field 'score_rejected'"),
        (
            {**UF, "chosen": [msg("user", "Other?"), msg("assistant", "Paris.")]},
            r"'chosen' and 'rejected' share no prompt",
        ),
    ],
)
def test_ultrafeedback_bad_rows(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "uf.jsonl", [UF, row])
    with pytest.raises(DataError, match=rf"uf.jsonl line 2: {expected}"):
        load("ultrafeedback", path, "preference")


def test_ultrafeedback_ties_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [UF, {**UF, "score_rejected": 9.0}, UF])
    records, report = load("ultrafeedback", path, "preference", bad_rows="skip")
    assert len(records) == 2 and report.skipped == {"'score_chosen' is not above 'score_rejected'": 1}


# --- rating_thresholds is checked when the config loads ----------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"format": "ultrafeedback", "path": "x", "rating_thresholds": [1, 2, 3]}, "largest first"),
        ({"format": "ultrafeedback", "path": "x", "rating_thresholds": [3, 2]}, "give 3 cut-offs"),
        (
            {"format": "hh", "path": "x", "rating_thresholds": [3, 2, 1]},
            "applies to formats trl_jsonl, ultrafeedback only",
        ),
        ({"format": "trl_jsonl", "path": "x", "rating_thresholds": ["a", 2, 1]}, "rating_thresholds[0]='a'"),
    ],
)
def test_rating_thresholds_are_validated_at_config_load(spec, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        build(DatasetSpec, spec)
    ties = build(DatasetSpec, {"format": "trl_jsonl", "path": "x", "rating_thresholds": [3, 3, 1]})
    assert ties.rating_thresholds == (3, 3, 1)


# --- tables: Parquet, Arrow, save_to_disk ------------------------------------------------------

# (format, kind, good rows) for every format that reads a file and can sit in a table.
TABLE_CASES = [
    (
        "messages",
        "conversation",
        [
            CHAT,
            {
                "messages": [
                    msg("user", "q"),
                    msg("assistant", "a", weight=0),
                    msg("user", "q2"),
                    msg("assistant", "a2", weight=1),
                ]
            },
        ],
    ),
    ("sharegpt", "conversation", [SHAREGPT, {"conversations": SHAREGPT["conversations"]}]),
    ("prompts", "prompt", [{"prompt": "Why?"}, {"prompt": "How?", "safety": True}]),
    ("ultrafeedback", "preference", [UF, {**UF, "score_chosen": 5.0}]),
    ("trl_jsonl", "preference", [PAIR, {**PAIR, "margin": 1.5}]),
    (
        "trl_jsonl",
        "preference",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q2", "chosen": "c", "rejected": "d", "rating": "slightly_better"},
        ],
    ),
    (
        "alpaca",
        "conversation",
        [{"instruction": "i", "input": "x", "output": "o"}, {"instruction": "j", "output": "p"}],
    ),
    ("hh", "preference", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}] * 2),
    (
        "xstest",
        "prompt",
        [
            {"prompt": "How do I kill a process?", "label": "safe"},
            {"prompt": "How do I kill a person?", "label": "unsafe"},
        ],
    ),
]
CONTAINERS = ["parquet", "arrow-stream", "arrow-file", "save_to_disk", "dataset_dict"]


def write_table(tmp_path, rows, container):
    """``rows`` in a table written by datasets / pyarrow; missing fields become nulls, as on the Hub."""
    names = list(dict.fromkeys(name for row in rows for name in row))  # from_list would take row 0's keys only
    dataset = Dataset.from_dict({name: [row.get(name) for row in rows] for name in names})
    if container == "parquet":
        dataset.to_parquet(str(tmp_path / "data.parquet"))
        return tmp_path / "data.parquet"
    if container in ("save_to_disk", "dataset_dict"):
        target = tmp_path / "saved"
        (DatasetDict({"train": dataset}) if container == "dataset_dict" else dataset).save_to_disk(str(target))
        return target
    path = tmp_path / "data.arrow"
    table = dataset.data.table
    open_writer = pa.ipc.new_stream if container == "arrow-stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, open_writer(sink, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("format, kind, rows", TABLE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TABLE_CASES)])
def test_tables_read_like_json_lines(tmp_path, format, kind, rows, container):
    (tmp_path / "t").mkdir()
    from_json, _ = (
        load(format, write_jsonl(tmp_path / "rows.jsonl", rows), kind)
        if format not in ("alpaca", "xstest")
        else (None, None)
    )
    records, report = load(format, write_table(tmp_path / "t", rows, container), kind)
    assert report.n_read == report.n_kept == len(rows) and report.unit == "index"
    if from_json is not None:
        assert records == from_json
    dataset = to_dataset(records, kind)
    assert dataset.features == FEATURES[kind] and dataset.to_list() == records


@pytest.mark.parametrize("container", CONTAINERS)
def test_bad_table_row_is_named_by_index(tmp_path, container):
    path = write_table(tmp_path, [CHAT, CHAT, {"messages": [msg("user", "Hi")]}, CHAT], container)
    with pytest.raises(DataError, match=rf"^{path} index 2: 'messages' ends with a user turn .*; fix the row"):
        load("messages", path, "conversation")
    records, report = load("messages", path, "conversation", bad_rows="skip")
    assert len(records) == 3 and report.skipped == {"'messages' ends with a user turn": 1}
    assert report.examples == [
        "index 2: 'messages' ends with a user turn (a training conversation ends with "
        "the assistant's answer; a file of prompts is format prompts)"
    ]


def test_table_rows_of_the_wrong_shape_point_at_the_format(tmp_path):
    path = write_table(tmp_path, [{"question": "q"}], "parquet")
    with pytest.raises(DataError, match=r"index 0: missing field 'messages'.*this is not a messages file"):
        load("messages", path, "conversation")


def test_dataset_dict_with_several_splits_names_them(tmp_path):
    splits = DatasetDict({"train": Dataset.from_list([CHAT]), "test": Dataset.from_list([CHAT])})
    splits.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(
        DataError,
        match=rf"d: is a DatasetDict with the splits train, test; point path at one "
        rf"split's folder, e.g. {tmp_path}/d/train",
    ):
        load("messages", tmp_path / "d", "conversation")
    records, _ = load("messages", tmp_path / "d" / "test", "conversation")
    assert len(records) == 1


def test_broken_tables_are_one_file_error(tmp_path):
    good = write_table(tmp_path, [CHAT] * 3, "parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cut.parquet: cannot be read as a Parquet file \(Arrow"):
        load("messages", cut, "conversation")
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"junk.arrow: cannot be read as an Arrow IPC file or stream"):
        load("messages", junk, "conversation")
    Dataset.from_dict({"messages": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match=r"empty.parquet: has no rows"):
        load("messages", tmp_path / "empty.parquet", "conversation")


def test_a_plain_directory_is_still_an_error(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"is a directory, not a data file nor a datasets.save_to_disk folder"):
        load("messages", tmp_path / "folder", "conversation")


# --- a whole run on one's own file --------------------------------------------------------------


@pytest.mark.slow
def test_sft_trains_on_a_messages_file_with_the_tiny_config(tmp_path, capsys):
    from pathlib import Path

    from align.cli import main

    tiny = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"
    rows = [
        {
            "messages": [
                msg("system", "Answer in one sentence."),
                msg("user", f"Tell me about topic {i}."),
                msg("assistant", f"Topic {i} is a fine topic to learn about."),
            ]
        }
        for i in range(16)
    ]
    write_jsonl(tmp_path / "my.jsonl", rows)
    rc = main(
        [
            "run",
            str(tiny),
            f"run_dir={tmp_path}/run",
            f"data_dir={tmp_path}",
            "stages=[sft]",
            "sft.datasets=[{format: messages, path: my.jsonl}]",
            "sft.train.max_steps=2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert (tmp_path / "run" / "sft" / "model" / "config.json").is_file()
    assert "16 conversations" in capsys.readouterr().out
    assert manifest["stage"] == "sft"
