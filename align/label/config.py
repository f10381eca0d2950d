"""`LabelConfig`: the settings of one preference-labeling round (Llama 2 sec. 3.2.1).

A round samples two responses per prompt from the current policy with two sampling settings
(`sampling_a` / `sampling_b`, optionally from two checkpoints), stores them as a labeling batch,
has each pair labeled by `labels_per_pair` labelers (people through the web page, or the automatic
judge of align/label/auto.py), and exports the majority label of each pair as canonical preference
records (align/data/schema.py).
"""

from __future__ import annotations

# The classes live beside the other stage configs (align/config.py), so PipelineConfig can hold them.
from align.config import SKIP_POLICIES, TIE_POLICIES, AutoLabelConfig, LabelConfig  # noqa: F401


def load_label_config(path, overrides=()) -> tuple:
    """(PipelineConfig, LabelConfig) of a pipeline YAML with a ``label:`` section."""
    from align.config import load_config
    from align.configlib import ConfigError

    cfg = load_config(path, overrides)
    if cfg.label is None:
        raise ConfigError(f"{path}: no 'label:' section; add one (see LabelConfig in align/config.py)")
    return cfg, cfg.label
