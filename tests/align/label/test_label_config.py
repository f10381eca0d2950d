"""LabelConfig: checks with a message that names the fix, and reading the label: section of a YAML."""

from __future__ import annotations

import pytest

from align.config import DatasetSpec, SamplingConfig
from align.configlib import ConfigError, build, help_lines
from align.label.config import LabelConfig, load_label_config

PROMPTS = (DatasetSpec(format="synthetic_prompts"),)

YAML = """
seed: 2
stages: [sft]
precision: fp32
model: {source: tiny}
sft: {datasets: [{format: synthetic_sft}]}
label:
  init: base
  prompts: [{format: synthetic_prompts, limit: 8}]
  labels_per_pair: 3
  sampling_b: {temperature: 1.3}
  auto: {judge: rules}
"""


def test_defaults_and_checks():
    cfg = LabelConfig(prompts=PROMPTS)
    assert (cfg.labels_per_pair, cfg.ties, cfg.skips, cfg.drop_unsafe_chosen) == (1, "drop", "ignore", True)
    assert (cfg.sampling_a.temperature, cfg.sampling_b.temperature) == (0.7, 1.2)
    with pytest.raises(ConfigError, match="prompts"):
        LabelConfig()
    with pytest.raises(ConfigError, match="labels_per_pair"):
        LabelConfig(prompts=PROMPTS, labels_per_pair=0)
    with pytest.raises(ConfigError, match="must differ"):
        LabelConfig(
            prompts=PROMPTS, sampling_a=SamplingConfig(temperature=1.0), sampling_b=SamplingConfig(temperature=1.0)
        )
    LabelConfig(prompts=PROMPTS, init_b="ppo", sampling_a=SamplingConfig(), sampling_b=SamplingConfig())  # two policies
    with pytest.raises(ConfigError, match="ties"):
        build(LabelConfig, {"prompts": [{"format": "synthetic_prompts"}], "ties": "keep"})
    with pytest.raises(ConfigError, match="Did you mean 'labels_per_pair'"):
        build(LabelConfig, {"prompts": [{"format": "synthetic_prompts"}], "label_per_pair": 2})
    assert all("#  " not in line and line.split("# ", 1)[1] for line in help_lines(LabelConfig))  # every key has help


def test_load_label_config_reads_the_section_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(YAML)
    cfg, label = load_label_config(path, ["label.labels_per_pair=5", "label.auto.flip_prob=0.2", "seed=4"])
    assert cfg.seed == 4 and cfg.name == "exp" and cfg.run_dir.endswith("exp") and cfg.model.source == "tiny"
    assert label.labels_per_pair == 5 and label.auto.flip_prob == 0.2 and label.auto.judge == "rules"
    assert label.sampling_b.temperature == 1.3 and label.sampling_b.max_new_tokens == 128
    with pytest.raises(ConfigError, match="unknown key 'label.auto.flip'"):
        load_label_config(path, ["label.auto.flip=0.2"])
    bare = tmp_path / "bare.yaml"
    bare.write_text("stages: [sft]\nsft: {datasets: [{format: synthetic_sft}]}\n")
    with pytest.raises(ConfigError, match="no 'label:' section"):
        load_label_config(bare)
