"""The stage registry: a stage added by one `register` call alone (config section, validation, preflight,
key, run, manifest, skip on rerun), and the facts of the built-in stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from align.config import DatasetSpec, load_config, pipeline_config_class
from align.configlib import ConfigError, check, help_lines, option
from align.data.load import load_datasets
from align.io import read_json, write_text_atomic
from align.pipeline import StageContext, run_pipeline, stage_status
from align.stages import STAGES, StageSpec, registered

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


@dataclass(frozen=True)
class ToyConfig:
    greeting: str = option("hello", help="written to greeting.txt")
    prompts: tuple[DatasetSpec, ...] = option(factory=tuple, help="prompt datasets; the stage counts them")
    after: str = option("", help="a stage that must run before this one ('' = none)")

    def __post_init__(self):
        check(self.greeting != "", "greeting", self.greeting, "say something")


def run_toy(ctx: StageContext) -> dict:
    cfg: ToyConfig = ctx.stage_cfg
    prompts, _ = load_datasets(cfg.prompts, "prompt", ctx.cfg.data_dir, seed=ctx.cfg.seed)
    write_text_atomic(ctx.out_dir / "greeting.txt", f"{cfg.greeting} x{len(prompts)}\n")
    return {"toy/prompts": len(prompts)}


TOY = StageSpec(
    name="toy",
    kind="toy",
    config=ToyConfig,
    run=f"{__name__}:run_toy",
    help="a toy stage",
    reads=lambda section: (section.after,) if section.after else (),
    data_fields={"prompts": "prompt"},
)
TOY_ARGS = ["stages=[toy]", "toy.greeting=hi", "toy.prompts=[{format: synthetic_prompts, limit: 5}]"]


def test_a_stage_registered_alone_runs_through_the_pipeline(tmp_path):
    with registered(TOY):
        cfg = load_config(TINY, [f"run_dir={tmp_path}/run", *TOY_ARGS])
        assert isinstance(cfg.toy, ToyConfig) and cfg.toy.greeting == "hi"
        assert any(line.startswith("toy.greeting:") for line in help_lines(pipeline_config_class()))
        [m] = run_pipeline(cfg)
        run_dir = Path(cfg.run_dir)
        assert m["kind"] == "toy" and m["summary"] == {"toy/prompts": 5}
        assert (run_dir / "toy" / "greeting.txt").read_text() == "hi x5\n"
        assert read_json(run_dir / "toy" / "manifest.json")["config"]["greeting"] == "hi"
        # Done: a second run skips it; it does not generate, so the engine's settings do not touch its key.
        [again] = run_pipeline(load_config(TINY, [f"run_dir={tmp_path}/run", *TOY_ARGS, "rollout.kv_cache_gib=3"]))
        assert again["finished_at"] == m["finished_at"]
        changed = load_config(TINY, [f"run_dir={tmp_path}/run", *TOY_ARGS[:-1], "toy.greeting=bye"])
        assert stage_status(changed, "toy", run_dir) == "stale"
        # Its own validation, its `reads`, and the nearest-key hint all come from the registration.
        with pytest.raises(ConfigError, match="greeting"):
            load_config(TINY, [*TOY_ARGS, "toy.greeting="])
        with pytest.raises(ConfigError, match="needs the output of stage 'sft'"):
            load_config(TINY, [*TOY_ARGS, "toy.after=sft"])
        with pytest.raises(ConfigError, match="Did you mean 'greeting'"):
            load_config(TINY, [*TOY_ARGS, "toy.greting=x"])
    assert "toy" not in STAGES
    with pytest.raises(ConfigError, match="unknown key 'toy'"):
        load_config(TINY, TOY_ARGS)


def test_a_stage_name_is_registered_once():
    with pytest.raises(ValueError, match="registered already"):
        with registered(TOY), registered(TOY):
            pass
    assert "toy" not in STAGES


def test_builtin_stages():
    assert list(STAGES) == ["sft", "rm_helpful", "rm_safety", "rejection_sampling", "ppo", "gatt", "eval", "label"]
    assert [n for n, s in STAGES.items() if s.policy] == ["sft", "rejection_sampling", "ppo", "gatt"]
    assert [n for n, s in STAGES.items() if not s.engine] == ["sft", "rm_helpful", "rm_safety"]
    for spec in STAGES.values():
        assert callable(spec.run_function()) and spec.config_class().__name__.endswith("Config")
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert STAGES["rejection_sampling"].reads(cfg.rejection_sampling) == ("rm_helpful", "rm_safety")


def test_only_stages_that_generate_hash_the_engine_settings():
    base = load_config(TINY)
    other = load_config(TINY, ["rollout.kv_cache_gib=3"])
    changed = {n for n in base.stages if base.stage_hash(n) != other.stage_hash(n)}
    assert changed == {"rejection_sampling", "gatt"}
