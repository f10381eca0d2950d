"""Canonical record schemas, as `datasets` features.

Three kinds of record flow through the pipeline:

- conversation (SFT, GAtt): ``{"messages": [{"role", "content", "train"}], "source"}``. ``role`` is
  ``system`` | ``user`` | ``assistant``; ``train`` is True on the assistant turns whose tokens carry
  loss (the per-turn loss flag; always False on system and user turns).
- preference pair (reward models, labeling): ``{"prompt": [{"role", "content"}], "chosen", "rejected",
  "rating", "category", "chosen_safe", "rejected_safe", "margin", "source"}``. ``prompt`` is the
  conversation up to and including the last user turn; ``chosen``/``rejected`` are the two final
  assistant answers. ``rating`` is one of RATINGS (how much better ``chosen`` is). ``category`` is
  ``helpfulness`` | ``safety``. ``*_safe`` are per-response safety labels (None = unknown).
  ``margin`` is an explicit margin from the source file (None = derive from the rating).
- prompt (rejection sampling, PPO, evaluation): ``{"prompt": [{"role", "content"}], "safety", "source"}``;
  ``safety`` True marks a safety-tagged prompt (the combined reward then uses the safety RM).
"""

from __future__ import annotations

from datasets import Features, List, Value

# The recipe's 4 rating levels (Llama 2 sec. 3.2.1), strongest first; the order is the index order
# of every margin table.
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
CATEGORIES = ("helpfulness", "safety")
ROLES = ("system", "user", "assistant")

MESSAGE = {"role": Value("string"), "content": Value("string")}

CONVERSATION_FEATURES = Features(
    {
        "messages": List({"role": Value("string"), "content": Value("string"), "train": Value("bool")}),
        "source": Value("string"),
    }
)

PREFERENCE_FEATURES = Features(
    {
        "prompt": List(MESSAGE),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "rating": Value("string"),
        "category": Value("string"),
        "chosen_safe": Value("bool"),
        "rejected_safe": Value("bool"),
        "margin": Value("float32"),
        "source": Value("string"),
    }
)

PROMPT_FEATURES = Features(
    {
        "prompt": List(MESSAGE),
        "safety": Value("bool"),
        "source": Value("string"),
    }
)

FEATURES = {"conversation": CONVERSATION_FEATURES, "preference": PREFERENCE_FEATURES, "prompt": PROMPT_FEATURES}
