"""How much of the held-out helpfulness signal is beyond length: rules of one surface feature, and a
logistic regression over eight of them fitted on the stage's training pairs, scored on `rm_helpful`'s
held-out helpfulness pairs (the same split the stage makes) by accuracy and length-balanced accuracy.
No model is loaded; a ceiling for what form alone tells (docs/reward-models.md).

    .venv/bin/python bench/rm_surface.py             # configs/default.yaml's rm_helpful split
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the reward package, not bench/reward.py

FEATURES = (
    "log_chars",
    "distinct_words",
    "list",
    "final_punct",
    "refusal",
    "prompt_overlap",
    "log_breaks",
    "mean_word",
)


def text(messages) -> str:
    return messages if isinstance(messages, str) else messages[-1]["content"]


def features(answer: str, prompt: str) -> list[float]:
    words = answer.split()
    asked = set(prompt.lower().split())
    return [
        math.log1p(len(answer)),
        len(set(words)) / max(1, len(words)),
        float(bool(re.search(r"^\s*(\d+\.|-|\*)\s", answer, re.M))),
        float(answer.strip()[-1:] in ".!?)\"'"),
        -float(bool(re.search(r"\b(sorry|cannot|can't|as an ai|I am unable)\b", answer, re.I))),
        len({w.lower() for w in words} & asked) / max(1, len(asked)),
        math.log1p(answer.count("\n")),
        statistics.fmean(len(w) for w in words) if words else 0.0,
    ]


def pair_rows(records) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen - rejected features (N, 8), chosen-is-longer (N,) as 1 / 0 / 0.5 for a tie)."""
    diffs, longer = [], []
    for r in records:
        c, j, p = text(r["chosen"]), text(r["rejected"]), text(r["prompt"])
        diffs.append([a - b for a, b in zip(features(c, p), features(j, p))])
        longer.append(1.0 if len(c) > len(j) else 0.0 if len(c) < len(j) else 0.5)
    return torch.tensor(diffs), torch.tensor(longer)


def accuracies(gap: torch.Tensor, longer: torch.Tensor) -> tuple[float, float]:
    """Accuracy (a tie counts half) and the mean of the accuracies on chosen-longer and chosen-shorter pairs."""
    right = (gap > 0).float() + 0.5 * (gap == 0).float()
    balanced = (right[longer == 1].mean() + right[longer == 0].mean()) / 2
    return right.mean().item(), balanced.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    args = ap.parse_args()

    from align.config import load_config
    from reward.stage import build_splits

    cfg = load_config(args.config, [])
    train, test, _ = build_splits(cfg.rm_helpful, cfg, cfg.seed)
    train = [r for r in train if r["category"] == "helpfulness"]
    test = [r for r in test if r["category"] == "helpfulness"]
    x_train, _ = pair_rows(train)
    x_test, longer = pair_rows(test)
    print(f"{len(train)} training / {len(test)} held-out helpfulness pairs")
    for i, name in enumerate(FEATURES):
        acc, bal = accuracies(x_test[:, i], longer)
        print(f"  {name:15s} accuracy {100 * acc:5.1f}%  length-balanced {100 * bal:5.1f}%")
    scale = x_train.std(0) + 1e-6
    for keep_length in (True, False):
        mask = torch.ones(len(FEATURES))
        mask[0] = float(keep_length)
        w = torch.zeros(len(FEATURES), requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200)

        def loss():
            opt.zero_grad()
            value = torch.nn.functional.softplus(-(x_train / scale * mask) @ w).mean() + 1e-3 * (w**2).sum()
            value.backward()
            return value

        opt.step(loss)
        acc, bal = accuracies(((x_test / scale * mask) @ w).detach(), longer)
        label = "logistic regression" + ("" if keep_length else " without length")
        print(f"  {label:35s} accuracy {100 * acc:5.1f}%  length-balanced {100 * bal:5.1f}%")


if __name__ == "__main__":
    main()
