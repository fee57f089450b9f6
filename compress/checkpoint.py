"""Writing and reading compressed checkpoints, and the resumable work directory.

Output directory (a Hugging Face checkpoint):
    config.json              model config + quantization_config {quant_method: "compress",
                             format_version, recipe, plan: {module: LayerSpec}, avg bits}
    model*.safetensors       packed qweight/scale/zero per compressed Linear (format.py), dense rest;
                             sharded with an index when large
    tokenizer files, generation_config.json
    recipe.yaml              the resolved recipe
    README.md                model card with what was measured
    .partial/                only while a run is unfinished: one file per finished block
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress import format as fmt
from compress import parallel
from compress.errors import CompressError
from compress.hf import CompressConfig, register
from compress.util import atomic_write

log = logging.getLogger(__name__)


class WorkDir:
    """Finished blocks of an unfinished run, so that re-running the same command resumes it.

    A block file is written to a temporary name and renamed, so an interrupted write never leaves a
    half file behind; work from a different command (other model, recipe or format) is discarded.
    Under several processes (compress.parallel) only rank 0 writes; the others read what it wrote.
    """

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]) -> None:
        self.dir = Path(out_dir) / ".partial"
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        stamp = self.dir / "fingerprint.json"
        with parallel.main_first():
            if parallel.is_main():
                if self.dir.exists():
                    old = json.loads(stamp.read_text()) if stamp.is_file() else None
                    if old != self.fingerprint:
                        log.warning("discarding unfinished work in %s: it came from a different command", self.dir)
                        shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True, exist_ok=True)
                stamp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))

    def _path(self, i: int) -> Path:
        return self.dir / f"block_{i:05d}.safetensors"

    @property
    def finished(self) -> int:
        return len(list(self.dir.glob("block_*.safetensors")))

    def load_block(self, i: int) -> dict[str, torch.Tensor] | None:
        p = self._path(i)
        return load_file(p) if p.is_file() else None

    def save_block(self, i: int, block: nn.Module) -> None:
        if not parallel.is_main():
            return
        tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
        atomic_write(self._path(i), lambda tmp: save_file(tensors, tmp))

    def load_json(self, name: str) -> Any:
        p = self.dir / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def save_json(self, name: str, obj: Any) -> None:
        if not parallel.is_main():
            return
        text = json.dumps(obj, default=float)
        atomic_write(self.dir / f"{name}.json", lambda tmp: tmp.write_text(text))

    def remove(self) -> None:
        if parallel.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)


def save(model: nn.Module, tokenizer: Any, plan: Any, recipe: Any, out_dir: Path, *, card: str,
         extra: dict[str, Any] | None = None, max_shard_size: str = "4GB", dtype: torch.dtype | None = None) -> None:
    """Write the compressed model as a Hugging Face checkpoint (see the module docstring). `dtype` casts the
    dense parts (embeddings, lm_head, norms, biases) first, in place; packed codes and scales keep their
    storage dtypes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model.to(dtype)
    qc = CompressConfig(plan=plan.to_json(), recipe=recipe.name, **(extra or {}))
    model.config.quantization_config = qc.to_dict()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def verify_files(path: Path) -> None:
    """Check every safetensors file's header and length; a truncated or corrupt file is a CompressError."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CompressError(f"{path} holds no .safetensors files; it is not a compressed checkpoint")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size:
                    raise ValueError("header longer than file")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise CompressError(f"{f} is corrupt (unreadable safetensors header: {e}); "
                                "re-run the compression or copy the file again") from e
        if size < 8 + n + end:
            raise CompressError(f"{f} is truncated ({size} of {8 + n + end} bytes); "
                                "re-run the compression or copy the file again")


def load(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | str = "auto") -> nn.Module:
    """Load a compressed checkpoint: packed CompressedLinears, logits equal to the model that was saved."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CompressError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config", {})
    except json.JSONDecodeError as e:
        raise CompressError(f"{cfg_file} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "the checkpoint is corrupt") from e
    if qc.get("quant_method") != fmt.QUANT_METHOD:
        raise CompressError(f"{path} is not a compress checkpoint (quant_method={qc.get('quant_method')!r})")
    verify_files(path)
    register()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, trust_remote_code=False,
                                                 use_safetensors=True)
    model.eval()
    return model


def disk_bytes(path: Path) -> int:
    """Bytes of the weight files in a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
