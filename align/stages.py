"""The stage registry: one `StageSpec` per stage, the only place the pipeline learns what stages exist.

A spec says which config section a stage reads (its class, its one-line help), which function runs
it, which earlier stages it needs, and what it is: whether it makes a policy checkpoint (the `eval`
stage evaluates those), whether it generates or scores with the rollout engine (only those stages'
keys hash the `rollout` section) and which of its fields are datasets (checked before a run starts).
`PipelineConfig` gets one optional section per registered stage (align/config.py).

Adding a stage: its own package (config class, `run_<stage>(ctx: StageContext) -> dict`) and one
`register(StageSpec(...))`; tests/align/test_stages.py runs a toy stage added that way alone.

This module imports nothing of align's, so every module may import it: the run functions (which load
torch) and the built-in config classes (whose module, align/config.py, imports this one) are named as
"module:attribute" and imported on first use.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping


def _reads_nothing(section: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class StageSpec:
    """One stage: what it reads and runs, and what it is."""

    name: str  # its config section, and its instance name in round 1
    kind: str  # the manifest's `kind` (both reward-model stages are `reward`); the report keys on it
    config: type | str  # the section's config class, or "module:Class" when that module imports this one
    run: str  # "module:function"; the function takes a StageContext and returns the summary dict
    help: str  # the section's one-line description (`align validate --keys`)
    reads: Callable[[Any], tuple[str, ...]] = _reads_nothing  # section -> stages that must come before it
    policy: bool = False  # its output is a policy checkpoint (model/ that loads with from_pretrained)
    engine: bool = False  # it generates or scores with the rollout engine: its key hashes `rollout`
    data_fields: Mapping[str, str] = field(default_factory=dict)  # dataset field -> record kind it holds

    def config_class(self) -> type:
        return _resolve(self.config) if isinstance(self.config, str) else self.config

    def run_function(self) -> Callable[[Any], dict]:
        return _resolve(self.run)


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add a stage; its name must be new."""
    if spec.name in STAGES:
        raise ValueError(f"stage '{spec.name}' is registered already")
    STAGES[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    del STAGES[name]


@contextlib.contextmanager
def registered(spec: StageSpec) -> Iterator[StageSpec]:
    """A stage registered for the duration of a `with` block (tests)."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def spec(name: str) -> StageSpec:
    return STAGES[name]


def _rm_reads(section: Any) -> tuple[str, ...]:
    return (section.reward.helpful_rm, section.reward.safety_rm)


def _rejection_reads(section: Any) -> tuple[str, ...]:
    teacher = (section.sampler,) if section.sampler in STAGES else ()
    return _rm_reads(section) + teacher


register(
    StageSpec(
        name="sft",
        kind="sft",
        config="align.config:SFTConfig",
        run="align.sft:run_sft",
        help="SFT stage",
        policy=True,
        data_fields={"datasets": "conversation"},
    )
)
for _name, _help in (("rm_helpful", "helpfulness reward model stage"), ("rm_safety", "safety reward model stage")):
    register(
        StageSpec(
            name=_name,
            kind="reward",
            config="align.config:RewardConfig",
            run="reward.stage:run_reward",
            help=_help,
            data_fields={"primary": "preference", "secondary": "preference"},
        )
    )
register(
    StageSpec(
        name="rejection_sampling",
        kind="rejection",
        config="align.config:RejectionConfig",
        run="align.rejection.stage:run_rejection",
        help="rejection-sampling fine-tuning stage",
        reads=_rejection_reads,
        policy=True,
        engine=True,
        data_fields={"prompts": "prompt"},
    )
)
register(
    StageSpec(
        name="ppo",
        kind="ppo",
        config="align.config:PPOConfig",
        run="align.ppo.stage:run_ppo",
        help="PPO stage",
        reads=_rm_reads,
        policy=True,
        engine=True,
        data_fields={"prompts": "prompt"},
    )
)
register(
    StageSpec(
        name="gatt",
        kind="gatt",
        config="align.config:GAttConfig",
        run="align.gatt.stage:run_gatt",
        help="Ghost Attention stage",
        policy=True,
        engine=True,
    )
)
register(
    StageSpec(
        name="eval",
        kind="eval",
        config="align.config:EvalConfig",
        run="align.evaluation:run_eval",
        help="evaluation of every policy checkpoint (RM scores, win rates, XSTest)",
        reads=_rm_reads,
        engine=True,
        data_fields={"prompts": "prompt", "xstest": "prompt"},
    )
)
register(
    StageSpec(
        name="label",
        kind="label",
        config="align.config:LabelConfig",
        run="align.label.stage:run_label",
        help="preference-labeling round: generate pairs, label (auto or people), export",
        engine=True,
    )
)
