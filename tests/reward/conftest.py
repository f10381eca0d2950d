"""Fixtures of the reward tests: an easy synthetic preference task (tiny_dir / tiny_tok: tests/conftest.py)."""

from __future__ import annotations

import random

import pytest

from align.data.schema import RATINGS

TOPICS = [
    "the weather",
    "gardening",
    "baking bread",
    "the moon",
    "rivers",
    "old maps",
    "chess",
    "bicycles",
    "tea",
    "owls",
    "music",
    "trains",
    "coral reefs",
    "volcanoes",
    "libraries",
    "kites",
]
POLITE = [
    "Thank you for asking about {t}. Here is a short, careful answer.",
    "Good question about {t}! I am happy to help and will explain it simply.",
    "Sure, I would be glad to tell you about {t}. Let me explain step by step.",
    "Happy to help with {t}. In short, it is an interesting subject with a long history.",
]


def junk(rng: random.Random) -> str:
    return " ".join(
        "".join(rng.choice("QWXZKJV#@!") for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(4, 8))
    )


def _make_pairs(
    n: int, seed: int = 0, source: str = "synthetic", category: str = "helpfulness", safety_labels: bool = False
) -> list[dict]:
    """Easy preference pairs in the schema of align/data/schema.py: polite answer beats ALL-CAPS junk."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = rng.choice(TOPICS)
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
                "chosen": rng.choice(POLITE).format(t=t),
                "rejected": junk(rng),
                "rating": RATINGS[i % len(RATINGS)],
                "category": category,
                "chosen_safe": True if safety_labels else None,
                "rejected_safe": False if safety_labels else None,
                "margin": None,
                "source": source,
            }
        )
    return out


@pytest.fixture(scope="session")
def make_pairs():
    """The factory `_make_pairs(n, seed=0, source=..., category=..., safety_labels=False)`."""
    return _make_pairs


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the 2 cores
    (measured: a forward+backward of the tiny RM on 8 x 128 tokens, 1.3 s on 2 contended threads,
    0.04 s on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
