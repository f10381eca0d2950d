"""The bad-input corpus: each case gets one clear message naming the file, row or key and a fix, a
non-zero exit, no traceback, and leaves the run directory as it was (here: never created)."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from align.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
DEFAULT = str(ROOT / "configs" / "default.yaml")

# (id, overrides on the tiny config, text the message must contain)
CONFIG_CASES = [
    ("unknown-top-key", ["foo.bar=1"], "unknown key 'foo'"),
    ("unknown-nested-key", ["sft.trian.lr=1"], "Did you mean 'train'"),
    ("misspelled-stage", ["stages=[sft,rm_helpfull]"], "rm_helpfull"),
    ("seed-not-int", ["seed=x"], "seed='x': expected an integer"),
    ("packing-not-bool", ["sft.packing=maybe"], "sft.packing='maybe': expected true or false"),
    ("negative-lr", ["sft.train.lr=-1"], "sft.train.lr=-1.0: must be > 0"),
    ("batch-not-divisible", ["sft.train.batch_size=10"], "sft.train.batch_size=10: must be a positive multiple"),
    ("micro-batch-zero", ["sft.train.micro_batch_size=0"], "micro_batch_size=0"),
    ("warmup-ratio-too-big", ["sft.train.warmup_ratio=1.5"], "warmup_ratio=1.5"),
    ("input-no-stage-makes", ["stages=[rm_helpful]"], "no earlier stage makes 'sft'"),
    ("stage-without-section", ["stages=[sft,eval]"], "has no 'eval:' section"),
    ("stage-twice", ["stages=[sft,sft]"], "listed twice"),
    (
        "rm-stage-not-listed",
        [
            "stages=[sft,rm_helpful]",
            "rejection_sampling={prompts: [{format: synthetic_prompts}]}",
            "stages=[sft,rm_helpful,rejection_sampling]",
        ],
        "needs the output of stage 'rm_safety'",
    ),
    ("override-without-equals", ["sft.train.lr"], "expected KEY=VALUE"),
    ("override-empty-key", ["=3"], "the key is empty"),
    ("custom-margin-without-table", ["rm_helpful.margin=custom"], "margin_table"),
    ("secondary-share-one", ["rm_helpful.secondary_share=1.0"], "secondary_share=1.0"),
    ("model-path-missing-key", ["model.source=path"], "model.path"),
    ("unknown-data-format", ["sft.datasets=[{format: csvish, path: x}]"], "sft.datasets[0].format='csvish'"),
    ("negative-limit", ["sft.datasets=[{format: alpaca, path: x, limit: -1}]"], "limit=-1"),
    ("file-format-without-path", ["sft.datasets=[{format: alpaca}]"], "set path"),
    ("dataset-not-a-mapping", ["sft.datasets=[3]"], "expected a mapping"),
    (
        "ppo-batch-arithmetic",
        [
            "ppo={prompts: [{format: synthetic_prompts}], prompts_per_iteration: 10, mini_batch_size: 4}",
            "stages=[sft,rm_helpful,rm_safety,ppo]",
        ],
        "prompts_per_iteration=10",
    ),
    ("rollout-memory-negative", ["rollout.kv_cache_gib=-1"], "kv_cache_gib=-1.0"),
    ("gatt-eval-repeats-zero", ["gatt.eval_repeats=0"], "gatt.eval_repeats=0: must be >= 1"),
    ("gatt-reference-max-parts-negative", ["gatt.reference_max_parts=-1"], "gatt.reference_max_parts=-1: must be >= 0"),
    (
        "rating-thresholds-unsorted",
        ["rm_helpful.primary=[{format: ultrafeedback, path: x, rating_thresholds: [1, 2, 3]}]"],
        "rating_thresholds=(1.0, 2.0, 3.0): give 3 cut-offs, largest first",
    ),
    (
        "rating-thresholds-wrong-format",
        ["sft.datasets=[{format: messages, path: x, rating_thresholds: [3, 2, 1]}]"],
        "applies to formats trl_jsonl, ultrafeedback only",
    ),
]


def _run(capsys, tmp_path, args):
    run_dir = tmp_path / "run"
    rc = main(["run", *args[:1], f"run_dir={run_dir}", *args[1:]])
    err = capsys.readouterr().err
    return rc, err, run_dir


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case, capsys, tmp_path):
    _, overrides, expected = case
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, *overrides])
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert err.count("\n") <= 2  # one message
    assert not run_dir.exists()


FILE_CASES = [
    ("missing-config", lambda d: d / "nope.yaml", "does not exist"),
    ("config-not-yaml", lambda d: _write(d / "c.yaml", "stages: [sft\n"), "not valid YAML"),
    ("config-a-list", lambda d: _write(d / "c.yaml", "- sft\n"), "top level must be a mapping"),
    ("config-not-utf8", lambda d: _write_bytes(d / "c.yaml", b"seed: \xff\xfe\n"), "not UTF-8"),
]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case, capsys, tmp_path):
    _, make, expected = case
    rc, err, run_dir = _run(capsys, tmp_path, [str(make(tmp_path))])
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert not run_dir.exists()


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _parquet(rows) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _turn(role, content):
    return {"role": role, "content": content}


GOOD = {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "no."}
# (id, file name, content (str or bytes), format, kind field, text the message must contain)
DATA_CASES = [
    ("missing-file", None, None, "alpaca", "sft", "does not exist"),
    ("not-json", "a.json", "this is not json", "alpaca", "sft", "a.json"),
    ("empty-file", "a.json", "", "alpaca", "sft", "a.json"),
    ("alpaca-missing-output", "a.json", json.dumps([{"instruction": "x", "input": ""}]), "alpaca", "sft", "output"),
    (
        "alpaca-empty-instruction",
        "a.json",
        json.dumps([{"instruction": "", "input": "", "output": "y"}]),
        "alpaca",
        "sft",
        "empty",
    ),
    ("pref-missing-chosen", "p.jsonl", _jsonl([GOOD, {"prompt": "x", "rejected": "y"}]), "trl_jsonl", "rm", "line 2"),
    ("pref-empty-chosen", "p.jsonl", _jsonl([{**GOOD, "chosen": ""}]), "trl_jsonl", "rm", "'chosen' is empty"),
    ("chosen-equals-rejected", "p.jsonl", _jsonl([{**GOOD, "rejected": GOOD["chosen"]}]), "trl_jsonl", "rm", "line 1"),
    ("unknown-rating", "p.jsonl", _jsonl([{**GOOD, "rating": "much_better"}]), "trl_jsonl", "rm", "much_better"),
    (
        "non-utf8-row",
        "p.jsonl",
        _jsonl([GOOD]).encode() + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n',
        "trl_jsonl",
        "rm",
        "line 2",
    ),
    ("row-not-object", "p.jsonl", _jsonl([GOOD]) + "[1, 2]\n", "trl_jsonl", "rm", "line 2"),
    ("broken-json-line", "p.jsonl", _jsonl([GOOD]) + '{"prompt": \n', "trl_jsonl", "rm", "line 2"),
    (
        "unknown-role",
        "p.jsonl",
        _jsonl([{"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}]),
        "trl_jsonl",
        "rm",
        "wizard",
    ),
    ("margin-not-number", "p.jsonl", _jsonl([{**GOOD, "margin": "big"}]), "trl_jsonl", "rm", "margin"),
    ("xstest-wrong-columns", "x.csv", "a,b\n1,2\n", "xstest", "eval", "x.csv"),
    (
        "hh-truncated-gzip",
        "h.jsonl.gz",
        gzip.compress(
            _jsonl([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]).encode()
        )[:-8],
        "hh",
        "rm",
        "h.jsonl.gz",
    ),
    ("oasst-json-list", "o.jsonl", json.dumps([{"prompt": {}}]), "oasst", "sft", "o.jsonl"),
    (
        "messages-ends-with-user",
        "c.jsonl",
        _jsonl([{"messages": [_turn("user", "hi")]}]),
        "messages",
        "sft",
        "line 1: 'messages' ends with a user turn",
    ),
    (
        "messages-parquet-bad-row",
        "c.parquet",
        _parquet([{"messages": [_turn("user", "hi"), _turn("assistant", "yo")]}, {"messages": [_turn("user", "hi")]}]),
        "messages",
        "sft",
        "index 1: 'messages' ends with a user turn",
    ),
    ("prompts-given-to-sft", "p.jsonl", _jsonl([{"prompt": "hi"}]), "prompts", "sft", "cannot give conversation"),
    (
        "implicit-pair-no-shared-prompt",
        "p.jsonl",
        _jsonl(
            [
                {
                    "chosen": [_turn("user", "a"), _turn("assistant", "b")],
                    "rejected": [_turn("user", "x"), _turn("assistant", "y")],
                }
            ]
        ),
        "trl_jsonl",
        "rm",
        "line 1: 'chosen' and 'rejected' share no prompt",
    ),
    (
        "ultrafeedback-tie",
        "u.jsonl",
        _jsonl(
            [
                {
                    "chosen": [_turn("user", "a"), _turn("assistant", "b")],
                    "rejected": [_turn("user", "a"), _turn("assistant", "c")],
                    "score_chosen": 5,
                    "score_rejected": 5,
                }
            ]
        ),
        "ultrafeedback",
        "rm",
        "line 1: 'score_chosen' is not above 'score_rejected'",
    ),
]


def _data_overrides(fmt, where, path):
    spec = f"[{{format: {fmt}, path: '{path}'}}]"
    if where == "sft":
        return ["stages=[sft]", f"sft.datasets={spec}"]
    if where == "rm":
        return ["stages=[rm_helpful]", "rm_helpful.init=base", f"rm_helpful.primary={spec}", "rm_helpful.secondary=[]"]
    return [
        "stages=[sft,rm_helpful,rm_safety,eval]",
        f"eval={{prompts: [{{format: synthetic_prompts}}], xstest: {spec}}}",
    ]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(case, capsys, tmp_path):
    _, name, content, fmt, where, expected = case
    path = tmp_path / (name or "missing.json")
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, "data.bad_rows=fail", *_data_overrides(fmt, where, path)])
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert path.name in err  # names the file
    assert not run_dir.exists()


def test_bad_row_skipped_and_counted_when_asked(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(_jsonl([GOOD] * 3 + [{**GOOD, "chosen": ""}]))
    from align.config import DatasetSpec
    from align.data.load import load_records

    records, report = load_records(DatasetSpec(format="trl_jsonl", path=str(path)), "preference", tmp_path, "skip")
    assert len(records) == 3 and report.n_skipped == 1


@pytest.fixture
def tiny_copy(tmp_path, tiny_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def test_model_dir_missing(capsys, tmp_path):
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, "model.source=path", f"model.path={tmp_path}/nowhere"])
    assert rc == 2 and "no such directory" in err and not run_dir.exists()


def test_model_dir_without_weights(capsys, tmp_path, tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, "model.source=path", f"model.path={tiny_copy}"])
    assert rc == 2 and "no weights" in err and not run_dir.exists()


def test_model_dir_without_config(capsys, tmp_path, tiny_copy):
    (tiny_copy / "config.json").unlink()
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, "model.source=path", f"model.path={tiny_copy}"])
    assert rc == 2 and "no config.json" in err and not run_dir.exists()


def test_tokenizer_without_chat_template(capsys, tmp_path, tiny_copy):
    for f in ("chat_template.jinja",):
        (tiny_copy / f).unlink(missing_ok=True)
    cfg = json.loads((tiny_copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tiny_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc, err, run_dir = _run(capsys, tmp_path, [TINY, "model.source=path", f"model.path={tiny_copy}"])
    assert rc == 2 and "no chat template" in err and not run_dir.exists()


def test_prompts_longer_than_the_context(capsys, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "word " * 100, "input": "", "output": "ok"}]))
    rc, err, run_dir = _run(
        capsys, tmp_path, [TINY, "stages=[sft]", f"sft.datasets=[{{format: alpaca, path: '{path}'}}]"]
    )
    assert rc == 2 and "max_length" in err and "Traceback" not in err, err
    assert not run_dir.exists()


def test_corpus_size():
    n = len(CONFIG_CASES) + len(FILE_CASES) + len(DATA_CASES) + 6
    assert n >= 40
