"""align/launch: the multi-node accelerate config (configs/launch/zero3-2x8gpu.yaml) reaches the
launch config of a stage, and accelerate's own launcher reads it as 2 machines x 8 processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align.errors import AlignError
from align.launch import machine_settings, write_launch_files

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "configs" / "launch" / "zero3-2x8gpu.yaml"


def _filled(tmp_path) -> Path:
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["main_process_ip"] = "10.0.0.1"
    path = tmp_path / "2x8.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_config_loads_and_its_placeholder_is_refused():
    raw = yaml.safe_load(SHIPPED.read_text())
    assert raw["num_machines"] == 2 and raw["num_processes"] == 16
    with pytest.raises(AlignError, match="main_process_ip is not set"):
        machine_settings(SHIPPED, env={})


def test_machine_settings_and_rank_from_env(tmp_path):
    path = _filled(tmp_path)
    assert machine_settings(env={}) == {}  # no ALIGN_ACCELERATE_CONFIG: one machine, as before
    m = machine_settings(env={"ALIGN_ACCELERATE_CONFIG": str(path), "ALIGN_MACHINE_RANK": "1"})
    assert m["num_machines"] == 2 and m["machine_rank"] == 1
    assert m["main_process_ip"] == "10.0.0.1" and m["main_process_port"] == 29500


def test_accelerate_launch_reads_two_machines(tmp_path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    machines = machine_settings(env={"ALIGN_ACCELERATE_CONFIG": str(_filled(tmp_path)), "ALIGN_MACHINE_RANK": "1"})
    acc_yaml = write_launch_files(tmp_path / "launch", 16, None, machines=machines)
    # the command line align's launcher runs (align/pipeline.py launch_workers), as accelerate parses it
    argv = ["--config_file", str(acc_yaml), "-m", "align.cli", "worker", "sft", "configs/llama2-70b.yaml"]
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.num_machines == 2 and args.num_processes == 16 and args.machine_rank == 1
    assert args.main_process_ip == "10.0.0.1" and args.main_process_port == 29500
    assert args.use_deepspeed and args.deepspeed_config_file.endswith("ds_zero3.json")
    assert args.training_script == "align.cli" and args.module
