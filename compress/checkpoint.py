"""Writing and reading compressed checkpoints (the resumable work directory is compress/workdir.py).

Output directory (a Hugging Face checkpoint):
    config.json              model config + quantization_config {quant_method: "compress",
                             format_version, recipe, plan: {module: LayerSpec}, avg bits,
                             unfused_experts: MoE modules stored one Linear per expert (compress/moe.py)}
    model*.safetensors       packed qweight/scale/zero per compressed Linear (format.py), dense rest;
                             sharded with an index when large
    tokenizer files, generation_config.json
    recipe.yaml              the resolved recipe
    README.md                model card with what was measured
    checksums.json           SHA-256 of every tensor's bytes, written last (compress/verify.py checks it on load)
    .partial/, .lock         only while a run is unfinished or running (compress/workdir.py)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import format as fmt
from compress import moe, verify
from compress.errors import CompressError
from compress.hf import CompressConfig, register
from compress.nn import CompressedLinear
from compress.plan import Plan

log = logging.getLogger(__name__)


def save(model: nn.Module, tokenizer: Any, plan: Any, recipe: Any, out_dir: Path, *, card: str,
         extra: dict[str, Any] | None = None, max_shard_size: str = "4GB", dtype: torch.dtype | None = None) -> None:
    """Write the compressed model as a Hugging Face checkpoint (see the module docstring). `dtype` casts the
    dense parts (embeddings, lm_head, norms, biases) first, in place; packed codes and scales keep their
    storage dtypes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model.to(dtype)
    unfused = [n for n, m in model.named_modules() if isinstance(m, moe.Experts)]  # the loader unfuses these too
    qc = CompressConfig(plan=plan.to_json(), recipe=recipe.name, **(extra or {}),
                        **({"unfused_experts": unfused} if unfused else {}))
    model.config.quantization_config = qc.to_dict()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    verify.write_checksums(out_dir)  # last: a checkpoint with checksums is a complete one


def save_streamed(model: nn.Module, tokenizer: Any, plan: Any, recipe: Any, out_dir: Path, *, card: str,
                  blocks: str, block_state: Callable[[int], dict[str, torch.Tensor] | None], n_blocks: int,
                  extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                  shard_bytes: int = 2 * 10**9) -> None:
    """`save` for a model whose blocks are on the meta device (compress/lazy.py): the weights are written shard by
    shard from the parts outside the blocks and each finished block's tensors (`block_state(i)`: the work
    directory's copy), so one block at a time is in memory. Same files as `save`; `dtype` casts the dense parts."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    packed = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, CompressedLinear) for b in m.packed()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        dense = dtype is not None and t.is_floating_point() and key not in packed
        return (t.to(dtype) if dense else t).contiguous()

    def parts() -> Iterator[dict[str, torch.Tensor]]:
        yield {k: cast(k, v) for k, v in model.state_dict().items() if not k.startswith(blocks + ".") and k not in tied}
        for i in range(n_blocks):
            state = block_state(i)
            if state is None:
                raise CompressError(f"block {i} is missing from the work directory; re-run the same command")
            yield {f"{blocks}.{i}.{k}": cast(f"{blocks}.{i}.{k}", v) for k, v in state.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    names: list[str] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        tensors = verify.as_saved(model, shards[0])
        name = f"model-{len(names) + 1:05d}.safetensors.tmp"
        save_file(tensors, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: len(names) for k in tensors})
        names.append(name)
        shards[0] = {}

    for part in parts():
        shards[0].update(part)
        total += sum(t.numel() * t.element_size() for t in part.values())
        if sum(t.numel() * t.element_size() for t in shards[0].values()) >= shard_bytes:
            flush()
    if shards[0]:
        flush()
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    if len(names) == 1:
        final = ["model.safetensors"]
    for tmp, name in zip(names, final, strict=True):
        (out_dir / tmp).replace(out_dir / name)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
        (out_dir / verify.INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    unfused = [n for n, m in model.named_modules() if isinstance(m, moe.Experts)]
    qc = CompressConfig(plan=plan.to_json(), recipe=recipe.name, **(extra or {}),
                        **({"unfused_experts": unfused} if unfused else {}))
    model.config.quantization_config = qc.to_dict()
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    verify.write_checksums(out_dir)


def quantization_config(path: Path) -> dict[str, Any]:
    """config.json's quantization_config of a compress checkpoint, checked: readable, ours, not too new."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CompressError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        qc = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise CompressError(f"{cfg_file} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "the checkpoint is corrupt") from e
    except (UnicodeDecodeError, AttributeError) as e:
        raise CompressError(f"{cfg_file} is not a JSON object of UTF-8 text; the checkpoint is corrupt") from e
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CompressError(f"{path} is not a compress checkpoint (quant_method={method!r})")
    return qc


def load(path: str | Path, *, device: str = "cpu", dtype: torch.dtype | str = "auto", verify_digests: bool = True
         ) -> nn.Module:
    """Load a compressed checkpoint: packed CompressedLinears, logits equal to the model that was saved. The files
    are checked against the plan first (compress/verify.py); `verify_digests=False` skips the checksums."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    quantization_config(path)
    verify.weight_files(path)  # a missing shard or an empty folder, before transformers looks
    register()
    with verify.checking(verify_digests):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, trust_remote_code=False,
                                                     use_safetensors=True)
    model.eval()
    return model


@dataclass(frozen=True)
class Inspection:
    """What `inspect` found in a checkpoint folder that passed every check."""

    plan: Plan
    shapes: dict[str, tuple[int, int]]  # (out_features, in_features) of every packed Linear
    tensors: int
    bytes: int
    checksums: bool  # were the tensors compared with checksums.json
    recipe: str | None
    config: Any = None  # the model's transformers config


def skeleton(path: Path) -> nn.Module:
    """The checkpoint's model on the meta device with its planned Linears swapped in (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise CompressError(f"{path}/config.json does not describe a model transformers can build "
                            f"({str(e).splitlines()[0][:160]})") from e
    qc = config.quantization_config
    verify.swap_plan(model, qc.get("plan") or {}, qc.get("unfused_experts"))
    return model


def inspect(path: str | Path, *, digests: bool = True) -> Inspection:
    """Run every check of a load without loading the model (`compress verify`): config, files, each tensor's
    dtype and shape against the plan, checksums (unless `digests` is False), finite scales."""
    path = Path(path)
    qc = quantization_config(path)
    files = verify.weight_files(path)
    model = skeleton(path)
    with verify.checking(digests):
        compared = verify.check_folder(path, model, files)
    verify.check_finite_files(files, model)
    plan = Plan({n: m.spec for n, m in model.named_modules() if isinstance(m, CompressedLinear)})
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    return Inspection(plan, shapes, len(verify.found_tensors(files)), sum(f.stat().st_size for f in files), compared,
                      qc.get("recipe"), model.config)


def disk_bytes(path: Path) -> int:
    """Bytes of the weight files in a checkpoint directory (safetensors shards, or a GGUF export's model.gguf)."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(path).glob(pattern))


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a folder whose config.json says it is a compress checkpoint (nothing else is checked)."""
    try:
        qc = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == fmt.QUANT_METHOD
