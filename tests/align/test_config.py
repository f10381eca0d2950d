"""Config loading: precedence, strictness, derived values, and every shipped YAML."""

from pathlib import Path

import pytest

from align.config import PipelineConfig, load_config
from align.configlib import ConfigError, build, help_lines

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _minimal(**extra):
    return {"stages": ["sft"], "sft": {"datasets": [{"format": "synthetic_sft"}]}, **extra}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.run_dir == str(Path("runs") / path.stem)
    for name in cfg.stages:
        assert cfg.stage(name) is not None
        assert len(cfg.stage_hash(name)) == 16


def test_shipped_configs_exist():
    assert {"default.yaml", "tiny.yaml", "llama2-7b.yaml"} <= {p.name for p in SHIPPED}


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stages: [sft]\nseed: 3\nsft:\n  datasets: [{format: synthetic_sft}]\n  train: {lr: 1.0e-4}\n")
    cfg = load_config(y)
    assert cfg.seed == 3 and cfg.sft.train.lr == 1e-4
    assert cfg.sft.train.epochs == 2.0  # the SFT section's own default, kept when YAML sets other train keys
    cfg = load_config(y, ["seed=5", "sft.train.lr=2e-5"])
    assert cfg.seed == 5 and cfg.sft.train.lr == 2e-5


def test_unknown_key_names_the_key_and_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*Did you mean 'seed'"):
        build(PipelineConfig, _minimal(sed=1))


def test_unknown_override_names_the_top_key():
    with pytest.raises(ConfigError, match=r"unknown key 'foo'"):
        load_config(ROOT / "configs" / "default.yaml", ["foo.bar=1"])


def test_a_removed_key_names_what_replaced_it():
    data = _minimal(stages=["gatt"], gatt={"every_prefix": True})
    with pytest.raises(ConfigError, match=r"'gatt.every_prefix' was removed: .*train_turns: all"):
        build(PipelineConfig, data)
    with pytest.raises(ConfigError, match=r"'gatt.every_prefix' was removed \(in override.*train_turns: last"):
        load_config(ROOT / "configs" / "default.yaml", ["gatt.every_prefix=false"])


def test_nested_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"sft.train.lrr.*Did you mean 'lr'"):
        build(PipelineConfig, _minimal(sft={"datasets": [{"format": "synthetic_sft"}], "train": {"lrr": 1e-5}}))


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"seed='x': expected an integer"):
        build(PipelineConfig, _minimal(seed="x"))


def test_negative_lr_rejected():
    with pytest.raises(ConfigError, match=r"sft.train.lr=-1.0: must be > 0"):
        build(PipelineConfig, _minimal(sft={"datasets": [{"format": "synthetic_sft"}], "train": {"lr": -1}}))


def test_batch_arithmetic_checked_and_derived():
    with pytest.raises(ConfigError, match=r"batch_size=10: must be a positive multiple of .* 4 \* 1 = 4"):
        build(
            PipelineConfig,
            _minimal(
                sft={"datasets": [{"format": "synthetic_sft"}], "train": {"batch_size": 10, "micro_batch_size": 4}}
            ),
        )
    cfg = build(
        PipelineConfig,
        _minimal(
            sft={
                "datasets": [{"format": "synthetic_sft"}],
                "train": {"batch_size": 16, "micro_batch_size": 4, "num_processes": 2},
            }
        ),
    )
    assert cfg.sft.train.grad_accum == 2


def test_stage_input_must_come_from_an_earlier_stage():
    data = _minimal(stages=["rm_helpful"], rm_helpful={"init": "sft", "primary": [{"format": "synthetic_pref"}]})
    with pytest.raises(ConfigError, match=r"rm_helpful.init='sft'.*no earlier stage makes 'sft'"):
        build(PipelineConfig, data)


def test_listed_stage_needs_its_section():
    with pytest.raises(ConfigError, match=r"stage 'rm_safety' is listed in stages but has no 'rm_safety:' section"):
        build(PipelineConfig, _minimal(stages=["sft", "rm_safety"]))


def test_config_is_frozen():
    cfg = build(PipelineConfig, _minimal())
    with pytest.raises(Exception):
        cfg.seed = 1


def test_stage_hash_changes_with_its_section_only():
    a = build(PipelineConfig, _minimal())
    b = build(PipelineConfig, _minimal(sft={"datasets": [{"format": "synthetic_sft"}], "max_length": 256}))
    assert a.stage_hash("sft") != b.stage_hash("sft")
    c = build(PipelineConfig, _minimal(name="other"))
    assert a.stage_hash("sft") == c.stage_hash("sft")


def test_engine_settings_rerun_only_the_stages_that_generate():
    path = ROOT / "configs" / "default.yaml"
    a, b = load_config(path), load_config(path, ["rollout.kv_cache_gib=3"])
    changed = {name for name in a.stages if a.stage_hash(name) != b.stage_hash(name)}
    assert changed == {"rejection_sampling", "ppo", "gatt", "eval"}


def test_yaml_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [sft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)


def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("seed: 0\nsft:\n  train:\n    lr: 1.0e-5\n    epochs: 1\n    lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lr' is given twice in one section, at lines 4 and 6"):
        load_config(cfg)
    top = tmp_path / "top.yaml"
    top.write_text("seed: 0\nseed: 1\n")
    with pytest.raises(ConfigError, match="key 'seed' is given twice.*lines 1 and 2"):
        load_config(top)
    unhashable = tmp_path / "unhashable.yaml"  # still a YAML error, as before the duplicate check
    unhashable.write_text("seed: 0\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="(?s)not valid YAML.*found unhashable key"):
        load_config(unhashable)
    ok = tmp_path / "ok.yaml"  # the same key in two sections is fine
    ok.write_text("rm_helpful:\n  max_length: 256\nrm_safety:\n  max_length: 256\n")
    from align.configlib import read_yaml

    assert read_yaml(ok) == {"rm_helpful": {"max_length": 256}, "rm_safety": {"max_length": 256}}


def test_every_key_has_help():
    for line in help_lines(PipelineConfig):
        assert line.split("#", 1)[1].strip(), f"no help text: {line}"
