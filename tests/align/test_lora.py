"""`lora.top_layers`: adapters only in the top decoder layers, and no gradient reaches below them."""

import pytest
import torch
from peft import get_peft_model

from align.config import LoraConfig
from align.errors import AlignError
from align.models import load_causal_lm, peft_lora_config, tiny_model_dir


def _layers_with_adapters(model) -> set[int]:
    return {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if "lora_" in n}


def test_top_layers_puts_adapters_in_the_top_layers_only_and_the_backward_stops_there():
    lm = load_causal_lm(tiny_model_dir())
    n = lm.config.num_hidden_layers
    model = get_peft_model(lm, peft_lora_config(LoraConfig(enabled=True, r=4, top_layers=1), n))
    assert _layers_with_adapters(model) == {n - 1}
    seen = []
    lower = model.base_model.model.model.layers[n - 2]
    lower.register_full_backward_hook(lambda *a: seen.append("lower"))
    ids = torch.randint(0, lm.config.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen == []  # nothing below the adapters needs a gradient
    assert all(p.grad is not None for n_, p in model.named_parameters() if p.requires_grad)

    every = get_peft_model(load_causal_lm(tiny_model_dir()), peft_lora_config(LoraConfig(enabled=True, r=4), n))
    assert _layers_with_adapters(every) == set(range(n))
    with pytest.raises(AlignError, match=f"top_layers=9.*at most {n}"):
        peft_lora_config(LoraConfig(enabled=True, top_layers=9), n)
