"""A checkpoint checks itself before any tensor is trusted (issue 18).

    weight_files(dir)                    the weight files, every shard named by the index present
    expected_tensors(model)              what a model skeleton (packed Linears swapped in) must find on disk
    check_tensors(dir, files, expected)  every expected key with its dtype and shape, nothing unexpected
    write_checksums(dir) / check_checksums(dir, files)
                                         SHA-256 per tensor, written at save time (checksums.json), compared
                                         on load: a flipped bit names its tensor
    check_finite(model)                  the loaded scales (every floating buffer of a packed Linear) are finite

`compress.load`, `from_pretrained` (through the registered quantizer, compress/hf.py), `compress eval`, every
exporter and `compress verify DIR` run these checks; `checking(digests=False)` (`--no-verify`) skips the
checksums only, the structural checks are cheap and always run.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress import digest, moe
from compress.errors import CompressError
from compress.nn import CompressedLinear, swap_linears
from compress.plan import Plan

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
INDEX = "model.safetensors.index.json"
_digests = contextvars.ContextVar("compress_verify_digests", default=True)

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
FLOATS = {"F64", "F32", "F16", "BF16"}


@contextmanager
def checking(digests: bool = True) -> Iterator[None]:
    """Loads inside this block compare checksums only if `digests` (the structural checks always run)."""
    token = _digests.set(digests)
    try:
        yield
    finally:
        _digests.reset(token)


def digests_enabled() -> bool:
    return _digests.get()


@dataclass(frozen=True)
class Expected:
    dtype: str | None  # a safetensors dtype that must match exactly (packed buffers); None: any float (dense)
    shape: tuple[int, ...]


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names (each must exist) or all in the folder."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CompressError(f"{index} is corrupt ({str(e)[:80]}); copy the checkpoint again") from e
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CompressError(f"{path} is missing weight shard {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + f" named by {INDEX}; copy the checkpoint again")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{path} holds no .safetensors files; it is not a compressed checkpoint")
    return files


def as_saved(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names and shapes `tensors` take on disk: transformers renames some keys when it saves (GPT-NeoX's
    lm_head is embed_out) and splits fused ones (Mixtral's 3-D experts into one weight per expert), and undoes it
    on load; its own reversal gives what save_pretrained wrote (works on meta tensors)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions saves the state dict as it is
        return tensors
    return dict(revert_weight_conversion(model, dict(tensors))) if tensors else {}


def expected_tensors(model: nn.Module) -> tuple[dict[str, Expected], set[str]]:
    """({on-disk key: Expected}, on-disk keys that may be absent because they are tied to another) of a model
    skeleton (any device, meta included) whose planned Linears are CompressedLinears."""
    state = model.state_dict()
    packed = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, CompressedLinear) for b in m.packed()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) & set(state)
    exact = set(as_saved(model, {k: state[k] for k in packed}))
    out = {}
    for key, t in as_saved(model, {k: v for k, v in state.items() if k not in tied}).items():
        strict = key in exact or not t.is_floating_point()
        out[key] = Expected(SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)) if strict else None, tuple(t.shape))
    optional = as_saved(model, {k: state[k] for k in tied})
    for key, t in optional.items():
        out.setdefault(key, Expected(None, tuple(t.shape)))
    return out, set(optional)


def found_tensors(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{key: (file, safetensors dtype, shape)} from the files' headers (no tensor data is read)."""
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        header, _ = digest.safetensors_header(f)
        for key, v in header.items():
            if key in found:
                raise CompressError(f"tensor {key} is stored twice ({found[key][0].name} and {f.name}); "
                                    "the checkpoint is damaged: copy it again")
            found[key] = (f, str(v.get("dtype")), tuple(v.get("shape", ())))
    return found


def check_tensors(path: Path, files: list[Path], expected: Mapping[str, Expected], optional: set[str]) -> None:
    """Every expected key present with its dtype and shape, nothing unexpected; one CompressError naming the
    first tensor that is wrong and how many more are."""
    found = found_tensors(files)
    problems = []
    for key, exp in expected.items():
        if key not in found:
            if key not in optional:
                problems.append(f"tensor {key} is missing")
            continue
        f, dt, shape = found[key]
        if exp.dtype is not None and dt != exp.dtype:
            problems.append(f"tensor {key} in {f.name} is {dt}, the plan stores it as {exp.dtype}")
        elif exp.dtype is None and dt not in FLOATS:
            problems.append(f"tensor {key} in {f.name} is {dt}, expected a floating dtype")
        elif shape != exp.shape:
            problems.append(f"tensor {key} in {f.name} has shape {list(shape)}, the plan sizes it {list(exp.shape)}")
    problems += [f"tensor {key} in {found[key][0].name} is not part of the model" for key in found
                 if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise CompressError(f"{path} does not match its plan: {problems[0]}{more}; the checkpoint is damaged or "
                            "was edited: re-run the compression or copy it again")


def write_checksums(path: Path) -> Path:
    """checksums.json beside the weights: {file: {tensor: sha256 of its bytes}}."""
    path = Path(path)
    sums = {f.name: digest.tensor_digests(f) for f in weight_files(path)}
    out = path / CHECKSUMS
    out.write_text(json.dumps({"algorithm": "sha256", "files": sums}, indent=1, sort_keys=True), encoding="utf-8")
    return out


def check_checksums(path: Path, files: list[Path]) -> bool:
    """Compare every tensor with checksums.json; False when the folder has none (written by an older compress
    or another tool), a CompressError naming the tensor when one differs."""
    path = Path(path)
    cfile = path / CHECKSUMS
    if not cfile.is_file():
        return False
    try:
        sums = json.loads(cfile.read_text(encoding="utf-8"))["files"]
        if not isinstance(sums, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise CompressError(f"{cfile} is corrupt ({str(e)[:80]}); copy the checkpoint again, or load with "
                            "--no-verify") from e
    listed = set(sums)
    for f in files:
        if f.name not in listed:
            raise CompressError(f"{f.name} has no entry in {CHECKSUMS}; the checkpoint was edited: re-run the "
                                "compression, or load with --no-verify")
        want = sums[f.name]
        got = digest.tensor_digests(f)
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                what = ("is not in the checksums" if key not in want else "is missing" if key not in got
                        else "does not match its checksum")
                raise CompressError(f"tensor {key} in {f.name} {what}: the file is damaged (a flipped bit or a "
                                    "bad copy); copy the checkpoint again or re-run the compression")
    return True


def swap_plan(model: nn.Module, plan_json: Mapping[str, Mapping], unfused: list[str] | None = None) -> Plan:
    """Unfuse the experts the checkpoint unfused (compress/moe.py), then swap the Linears config.json's plan names
    for empty CompressedLinears; a plan that does not fit the model (a module it lacks, an invalid spec) is one
    CompressError."""
    try:
        if unfused:
            moe.unfuse_experts(model, list(unfused))
        plan = Plan.from_json(plan_json)
        swap_linears(model, plan)
    except (AttributeError, TypeError, ValueError, KeyError, CompressError) as e:
        raise CompressError(f"the plan in config.json does not fit the model ({str(e).splitlines()[0][:160]}); "
                            "the checkpoint is damaged or was edited: re-run the compression") from e
    return plan


def check_finite(model: nn.Module) -> None:
    """Every floating buffer of every packed Linear (scales, zeros kept in floats, alpha/mu) is finite."""
    for name, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            for b, t in m.packed().items():
                if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    raise CompressError(f"{name}.{b} holds {bad} NaN/Inf value(s); the checkpoint is damaged: "
                                        "re-run the compression or copy it again")


def check_finite_files(files: list[Path], model: nn.Module) -> None:
    """`check_finite` on disk: reads only the floating buffers of the packed Linears (scales, alpha, mu)."""
    from safetensors import safe_open

    where = {k: f for k, (f, dt, _) in found_tensors(files).items() if dt in FLOATS}
    keys = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, CompressedLinear) for b in m.packed()]
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        if k in where:
            by_file.setdefault(where[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(str(f), framework="pt") as st:
            for k in ks:
                t = st.get_tensor(k)
                if not bool(torch.isfinite(t).all()):
                    raise CompressError(f"{k} holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s); the "
                                        "checkpoint is damaged: re-run the compression or copy it again")


def check_folder(path: Path, model: nn.Module, files: list[Path] | None = None) -> bool:
    """The checks that need no tensor data loaded (structure, then checksums unless disabled) of a checkpoint
    folder against a skeleton `model`; returns whether checksums were compared."""
    files = weight_files(path) if files is None else files
    expected, tied = expected_tensors(model)
    check_tensors(path, files, expected, tied)
    if not digests_enabled():
        return False
    ok = check_checksums(path, files)
    if not ok:
        log.warning("%s has no %s (written by an older compress or another tool): tensor data is not verified",
                    path, CHECKSUMS)
    return ok
