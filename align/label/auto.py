"""The automatic labeler: a judge that labels pairs through the same HTTP API as people, for
simulated rounds and CI.

Judges (``AutoLabelConfig.judge``):

- ``reward``: both reward models score both responses (`reward.model.RewardScorer`). The deciding
  score is the safety RM's on a ``safety`` pair and the helpfulness RM's otherwise (the split the
  combined reward makes, Llama 2 sec. 3.2.3); a response is safe when sigmoid(safety score) >=
  ``safe_threshold``.
- ``rules``: checkable text rules, no model. On a safety pair a refusal is safe and wins; any other
  response there is unsafe. Helpfulness points: non-empty (+1), at least 60% letters and spaces
  (+0.5), ends with . ! ? or a closing quote/bracket (+0.5), no word repeated 4 times in a row (+0.5).

From the deciding scores s_A, s_B: gap = |s_A - s_B|; below ``tie_below`` a tie, else the higher
wins with the rating from ``rating_gaps`` (gap >= g[0] significantly_better, >= g[1] better, >= g[2]
slightly_better, else negligibly_better). ``flip_prob`` swaps a labeler's choice at random (seeded
by labeler and pair) to simulate disagreement between labelers.

`auto_label` drives one labeler: GET /api/pairs/next (claiming up to ``batch_size`` pairs), judge them,
POST /api/labels one by one; with ``labels_per_pair`` k, k auto labelers ("auto-1" .. "auto-k") take
one slot of every pair each (`label_round`).
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path
from typing import Optional, Protocol, Sequence

from align.data.schema import RATINGS
from align.errors import AlignError
from align.label.config import AutoLabelConfig

REFUSAL = re.compile(
    r"\b(i\s*(?:'|’)?m sorry|i am sorry|i can(?:'|’)?t|i cannot|i won(?:'|’)?t|i will not|"
    r"i'm not able|i am not able|unable to help|can(?:'|’)?t help)\b",
    re.IGNORECASE,
)


class Judge(Protocol):
    def scores(self, pairs: Sequence[dict]) -> list[tuple[float, float, bool, bool]]:
        """Per pair: (deciding score of A, of B, A safe, B safe)."""


def is_refusal(text: str) -> bool:
    return bool(REFUSAL.search(text))


def rule_points(text: str) -> float:
    """The helpfulness points of the rules judge (see the module docstring)."""
    t = text.strip()
    if not t:
        return 0.0
    points = 1.0
    if sum(c.isalpha() or c.isspace() for c in t) >= 0.6 * len(t):
        points += 0.5
    if t[-1] in ".!?\"')]":
        points += 0.5
    words = t.lower().split()
    if not any(words[i] == words[i + 1] == words[i + 2] == words[i + 3] for i in range(len(words) - 3)):
        points += 0.5
    return points


class RuleJudge:
    """Checkable rules; needs no model."""

    def scores(self, pairs):
        out = []
        for p in pairs:
            if p["category"] == "safety":
                ra, rb = is_refusal(p["response_a"]), is_refusal(p["response_b"])
                out.append(
                    (
                        float(ra) + 0.1 * rule_points(p["response_a"]),
                        float(rb) + 0.1 * rule_points(p["response_b"]),
                        ra,
                        rb,
                    )
                )
            else:
                out.append((rule_points(p["response_a"]), rule_points(p["response_b"]), True, True))
        return out


class RewardJudge:
    """The helpfulness and safety reward models (saved RM directories)."""

    def __init__(self, helpful_dir: str | Path, safety_dir: str | Path, cfg: AutoLabelConfig):
        from reward.model import RewardScorer

        self.cfg = cfg
        self.helpful = RewardScorer.from_pretrained(helpful_dir)  # each with its scorer.json
        self.safety = RewardScorer.from_pretrained(safety_dir)

    def scores(self, pairs):
        prompts = [p["prompt"] for p in pairs] * 2
        responses = [p["response_a"] for p in pairs] + [p["response_b"] for p in pairs]
        h = self.helpful.score(prompts, responses, batch_size=self.cfg.batch_size).tolist()
        s = self.safety.score(prompts, responses, batch_size=self.cfg.batch_size).tolist()
        n = len(pairs)
        safe = [1 / (1 + math.exp(-x)) >= self.cfg.safe_threshold for x in s]
        out = []
        for i, p in enumerate(pairs):
            deciding = s if p["category"] == "safety" else h
            out.append((deciding[i], deciding[n + i], safe[i], safe[n + i]))
        return out


def decide(
    score_a: float,
    score_b: float,
    a_safe: bool,
    b_safe: bool,
    cfg: AutoLabelConfig,
    rng: Optional[random.Random] = None,
) -> dict:
    """The label body (choice, rating, a_safe, b_safe) for one pair's scores."""
    gap = abs(score_a - score_b)
    if gap < cfg.tie_below:
        return {"choice": "tie", "rating": None, "a_safe": a_safe, "b_safe": b_safe}
    choice = "a" if score_a >= score_b else "b"
    if rng is not None and cfg.flip_prob > 0 and rng.random() < cfg.flip_prob:
        choice = "b" if choice == "a" else "a"
    g = cfg.rating_gaps
    rating = RATINGS[0] if gap >= g[0] else RATINGS[1] if gap >= g[1] else RATINGS[2] if gap >= g[2] else RATINGS[3]
    return {"choice": choice, "rating": rating, "a_safe": a_safe, "b_safe": b_safe}


def _check(resp, what: str):
    if resp.status_code >= 400:
        raise AlignError(f"auto labeler: {what} failed with HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()


def auto_label(
    client,
    token: str,
    judge: Judge,
    cfg: AutoLabelConfig,
    *,
    round: Optional[int] = None,
    seed: int = 0,
    name: str = "auto",
    cache: Optional[dict] = None,
    max_pairs: int = 1_000_000,
) -> dict:
    """Label every pair the API offers this labeler (``round`` only, if given); return counts.

    ``client`` is an `httpx.Client` (or Starlette's TestClient, an in-process one) whose base URL is
    the app; ``token`` the labeler's bearer token. ``cache`` (pair id -> scores) lets several auto
    labelers share one scoring of each pair.
    """
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {token}"}
    cache = {} if cache is None else cache
    counts = {"a": 0, "b": 0, "tie": 0}
    done = 0
    params = {"limit": cfg.batch_size, **({"round": round} if round is not None else {})}
    bar = tqdm(desc=f"[label] {name}", unit="pair", leave=False)
    while done < max_pairs:  # bounded: each pass labels every pair it gets, so the queue shrinks
        got = _check(client.get("/api/pairs/next", params=params, headers=headers), "GET /api/pairs/next")
        pairs, progress = got["pairs"], got["progress"]
        bar.total = done + progress["assigned"] - progress["labeled"] + progress["available"]
        if not pairs:
            break
        todo = [p for p in pairs if p["id"] not in cache]
        if todo:
            cache.update(zip((p["id"] for p in todo), judge.scores(todo)))
        for p in pairs:
            body = decide(*cache[p["id"]], cfg, random.Random(f"{seed}:{name}:{p['id']}"))
            _check(client.post("/api/labels", json={"pair_id": p["id"], **body}, headers=headers), "POST /api/labels")
            counts[body["choice"]] += 1
            done += 1
            bar.update(1)
    bar.close()
    return {"labeled": done, **{f"choice/{k}": v for k, v in counts.items()}}


def auto_labelers(store, k: int, prefix: str = "auto") -> list[tuple[str, str]]:
    """``k`` auto labelers (``prefix-1`` ..) as (name, fresh token); created if missing. Their tokens
    are reset each call (only hashes are stored, so an old token cannot be read back)."""
    existing = {lab.name for lab in store.labelers()}
    out = []
    for i in range(1, k + 1):
        name = f"{prefix}-{i}"
        token = store.reset_token(name) if name in existing else store.add_labeler(name)
        out.append((name, token))
    return out


def make_judge(
    cfg: AutoLabelConfig, helpful_dir: Optional[str | Path] = None, safety_dir: Optional[str | Path] = None
) -> Judge:
    if cfg.judge == "rules":
        return RuleJudge()
    if helpful_dir is None or safety_dir is None:
        raise AlignError(
            "the reward judge needs both reward models: give --helpful-rm and --safety-rm "
            "(or set label.auto.judge: rules)"
        )
    for key, path in (("helpful_rm", helpful_dir), ("safety_rm", safety_dir)):
        if not (Path(path) / "config.json").is_file():
            raise AlignError(
                f"label.auto.{key}={path}: not a saved reward model directory (no config.json); "
                "run the reward-model stage first or point at its model/ directory"
            )
    return RewardJudge(helpful_dir, safety_dir, cfg)


def label_round(
    store,
    number: int,
    cfg: AutoLabelConfig,
    judge: Judge,
    *,
    labelers: Sequence[tuple[str, str]],
    seed: int = 0,
    url: Optional[str] = None,
) -> dict:
    """Let each auto labeler label what round ``number`` offers them, over HTTP: against a live
    server at ``url``, or in process against `create_app(store)`. Returns summed counts."""
    import httpx

    if url is not None:
        client = httpx.Client(base_url=url, timeout=60)
    else:
        from fastapi.testclient import TestClient

        from align.label.server import create_app

        client = TestClient(create_app(store), base_url="http://label.local")
    cache: dict = {}
    total: dict = {}
    with client:
        for name, token in labelers:
            counts = auto_label(client, token, judge, cfg, round=number, seed=seed, name=name, cache=cache)
            for k, v in counts.items():
                total[f"auto/{k}"] = total.get(f"auto/{k}", 0) + v
    return total
