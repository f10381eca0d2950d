"""A multiprocess-mode vLLM engine in its own process, for the shutdown tests (test_vllm_engine.py).

    python tests/rollout/engine_proc.py MODE

Prints `CHILDREN <pids>` (this process's descendants once the engine is up), then, by MODE:
  close  generate, push perturbed weights (the safetensors-in-/dev/shm route), check greedy output
         against transformers on them, close(), print `AFTER_CLOSE <pids>` and `GREEDY_MATCH <bool>`
  raise  raise inside the `with` block; print `AFTER_RAISE <pids>` once the exception is caught
  sigint print `LOOPING` and generate until a SIGINT arrives (the test sends it)
  exit   return without closing: interpreter exit must shut the engine down
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def descendants() -> list[int]:
    """Live descendant pids, leaving out multiprocessing's resource tracker (a helper of this
    interpreter, not of the engine, that exits with it; the test checks it is gone after exit too)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def descendants_after(wait_s: float = 10.0) -> list[int]:
    """`descendants()` once they are gone, or after `wait_s` (an engine process that ignored SIGTERM
    is SIGKILLed by vLLM's shutdown and may take a moment to die)."""
    deadline = time.time() + wait_s
    while (left := descendants()) and time.time() < deadline:
        time.sleep(0.5)
    return left


def all_descendants() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def main(mode: str) -> None:
    from align.config import RolloutConfig
    from align.models import load_causal_lm, tiny_model_dir
    from rollout import SamplingParams, make_engine

    cfg = RolloutConfig(kv_cache_gib=1, max_model_len=512, in_process=False)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0)
    prompts = [[{"role": "user", "content": "hi"}]]
    if mode == "exit":
        engine = make_engine(cfg, tiny_model_dir(), dtype="float32")
        engine.generate(prompts, sp)
        print("CHILDREN", *all_descendants(), flush=True)
        return
    if mode == "raise":
        try:
            with make_engine(cfg, tiny_model_dir(), dtype="float32") as engine:
                engine.generate(prompts, sp)
                print("CHILDREN", *all_descendants(), flush=True)
                raise RuntimeError("boom")
        except RuntimeError:
            print("AFTER_RAISE", *descendants_after(), flush=True)
        return
    with make_engine(cfg, tiny_model_dir(), dtype="float32") as engine:
        engine.generate(prompts, sp)
        print("CHILDREN", *all_descendants(), flush=True)
        if mode == "sigint":
            print("LOOPING", flush=True)
            while True:
                engine.generate(prompts * 4, SamplingParams(n=4, max_new_tokens=64))
        assert mode == "close", mode
        import importlib.util

        spec = importlib.util.spec_from_file_location("rollout_checks", Path(__file__).with_name("rollout_checks.py"))
        checks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(checks)
        new = checks.perturbed(load_causal_lm(tiny_model_dir(), "float32"))
        engine.update_weights(new)
        try:
            checks.check_greedy_matches(engine, new)
            match = True
        except AssertionError:
            match = False
        print("GREEDY_MATCH", match, flush=True)
        engine.close()
        engine.close()  # idempotent
        print("AFTER_CLOSE", *descendants_after(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
