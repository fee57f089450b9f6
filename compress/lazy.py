"""Models of any size on one machine: the model is built on the meta device and its tensors are read from the
safetensors shards only when their part is needed (issue 19).

    open_lazy(ref, dtype)         (model, tokenizer, Source): everything outside the block list is real
                                  (embeddings, final norm, lm_head, rotary tables), every block is on meta
    Source.fetch(i)               block i materialised from the shards (dense, the model's dtype)
    Source.release(i)             block i back on meta (its memory freed)
    Source.block_state(i)         what fetch would load, without touching the model

Peak memory is then about the embeddings + one block in float32 + its Hessians + the calibration activations,
whatever the depth. Tensor names on disk are the model's after transformers' save-time renames (e.g. GPT-NeoX's
embed_out); a model whose tensors do not map one to one onto the files (fused MoE experts split on save) cannot
stream and is refused in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from compress import digest, models
from compress.errors import CompressError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def _disk_name(model: nn.Module, key: str, t: Tensor) -> str:
    """The name save_pretrained gives the model's tensor `key` (transformers' own reversal of its load renames)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return key
    out = revert_weight_conversion(model, {key: t})
    if len(out) != 1:
        raise CompressError(f"{type(model).__name__} stores {key} as several tensors on disk ({', '.join(out)}); "
                            "this model cannot be read block by block yet: load it whole (--stream off)")
    return next(iter(out))


class Source:
    """The safetensors shards of a local model folder, read tensor by tensor (memory-mapped by safetensors)."""

    def __init__(self, folder: Path, model: nn.Module, arch: models.Arch) -> None:
        self.folder, self.model, self.arch = Path(folder), model, arch
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CompressError(f"{index} is corrupt ({str(e)[:80]}); re-download the model") from e
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        else:
            self.where = {k: f for f in sorted(self.folder.glob("*.safetensors"))
                          for k in digest.safetensors_header(f)[0]}
        missing = sorted({f for f in self.where.values() if not f.is_file()})
        if missing:
            raise CompressError(f"{self.folder} is missing weight shard {missing[0].name}; re-download the model")
        self._names: dict[str, str] = {}

    def disk_name(self, key: str, t: Tensor) -> str:
        if key not in self._names:
            self._names[key] = _disk_name(self.model, key, t)
        return self._names[key]

    def read(self, wanted: dict[str, Tensor]) -> dict[str, Tensor]:
        """{model key: tensor read from disk, cast to the dtype of `wanted[key]`}."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, t in wanted.items():
            name = self.disk_name(key, t)
            if name not in self.where:
                raise CompressError(f"{self.folder} has no tensor {name} (for {key}); the model folder is incomplete")
            by_file.setdefault(self.where[name], []).append((key, name))
        out = {}
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for key, name in keys:
                    t = st.get_tensor(name)
                    out[key] = t.to(wanted[key].dtype) if t.is_floating_point() else t
        return out

    def prefix(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}"

    def block_state(self, i: int) -> dict[str, Tensor]:
        block = models.blocks_of(self.model, self.arch)[i]
        state = {f"{self.prefix(i)}.{k}": v for k, v in block.state_dict().items()}
        got = self.read(state)
        return {k[len(self.prefix(i)) + 1 :]: v for k, v in got.items()}

    def fetch(self, i: int) -> nn.Module:
        """Materialise block i (dense) from the shards, in the model's dtype; returns the block."""
        block = models.blocks_of(self.model, self.arch)[i]
        block.load_state_dict(self.block_state(i), strict=True, assign=True)
        _init_buffers(self.model, block)
        models.check_finite(block, f"{self.folder} ({self.prefix(i)})")  # damaged weights: refused, named
        return block

    def release(self, i: int) -> None:
        """Block i back on the meta device: its tensors are freed (a later fetch or resume reloads them)."""
        models.blocks_of(self.model, self.arch)[i].to("meta")


def _init_buffers(model: nn.Module, part: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in any file: made real and initialised the way
    transformers initialises them after a meta-device load."""
    for sub in part.modules():
        meta = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta and n in sub._non_persistent_buffers_set]
        if not meta:
            continue
        for n in meta:
            sub._buffers[n] = torch.empty_like(sub._buffers[n], device="cpu")
        loaded = [t for t in sub.parameters() if not t.is_meta] + [
            b for n, b in sub.named_buffers(recurse=False) if n not in meta and not b.is_meta]
        for t in loaded:  # transformers' init functions leave tensors so marked alone
            t._is_hf_initialized = True
        versions = [t._version for t in loaded]
        model._init_weights(sub)  # type: ignore[operator]
        if [t._version for t in loaded] != versions:
            raise CompressError(f"initialising {type(sub).__name__}'s buffers outside a full load changed its loaded "
                                "weights; load this model whole (--stream off)")
        left = [n for n, b in sub.named_buffers(recurse=False) if n in meta and not torch.isfinite(b).all()]
        if left:
            raise CompressError(f"{type(sub).__name__}.{left[0]} could not be initialised outside a full load; "
                                "load this model whole (--stream off)")


def open_lazy(ref: models.ModelRef, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, Any, Source]:
    """(model with meta blocks, tokenizer, Source) for a local safetensors folder; see the module docstring."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(ref.source)
    if ref.gguf_file or not folder.is_dir():
        raise CompressError(f"{ref.display} is not a local folder of safetensors files, which reading block by block "
                            "needs; convert it (save_pretrained) or load it whole (--stream off)")
    models.refuse_unsafe(ref)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load model from {folder}: {str(e).splitlines()[0][:200]}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if dtype == "auto":
        dtype = models.stored_dtype(ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.eval()
    blocks_path = models.block_list(model)
    src = Source(folder, model, models.Arch(blocks_path, ()))
    # everything outside the blocks is real from here on
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(blocks_path + ".")}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    model.load_state_dict(src.read({k: v for k, v in rest.items() if k not in tied}), strict=False, assign=True)
    model.tie_weights()
    _init_buffers(model, model)
    models.check_finite(model, ref.display)  # the parts outside the blocks (the blocks are checked when fetched)
    if config.model_type not in models.ARCHS:  # the call order is traced on a real block 0, then freed again
        src.fetch(0)
        try:
            models.arch_of(model)
        finally:
            src.release(0)
    src.arch = models.arch_of(model)
    return model, tokenizer, src


def available_memory() -> int:
    """Bytes of memory this process can still have (Linux MemAvailable; the physical total elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def whole_model_bytes(ref: models.ModelRef, dtype: torch.dtype | str = "auto") -> int | None:
    """Memory a whole-model load of a local safetensors folder takes (its weights in the load dtype); None when
    unknown (a GGUF file, a hub id)."""
    folder = Path(ref.source)
    if ref.gguf_file or not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    stored = models.stored_dtype(ref)
    load = stored if dtype == "auto" else dtype
    scale = torch.empty((), dtype=load).element_size() / torch.empty((), dtype=stored).element_size()
    return int(sum(f.stat().st_size for f in files) * scale)


def should_stream(ref: models.ModelRef, dtype: torch.dtype | str, mode: str) -> bool:
    """--stream on|off|auto: auto reads block by block when the whole model would take more than half the memory
    available (the calibration, the Hessians and the rounding need the rest)."""
    if mode not in ("auto", "on", "off"):
        raise CompressError(f"--stream {mode!r} is invalid; choose auto, on or off")
    if mode != "auto":
        return mode == "on"
    need = whole_model_bytes(ref, dtype)
    return need is not None and need > available_memory() // 2


def describe(ref: models.ModelRef, dtype: torch.dtype | str) -> str:
    need = whole_model_bytes(ref, dtype)
    whole = f"{need / 1e9:.1f} GB whole" if need is not None else "size unknown"
    return f"{whole}, {available_memory() / 1e9:.1f} GB available"
