"""GPTQ-format checkpoints (GPTQ v1, the AutoGPTQ / GPTQModel layout) from a compressed model.

`problems()` says, before anything is calibrated, why a plan (or the plan a recipe's allocator will produce)
cannot be written or served as GPTQ; `write()` turns a model whose planned Linears are `CompressedLinear`s
into a Hugging Face checkpoint folder that GPTQ loaders read. Codes, scales and zero points are the
compressed model's own: nothing is re-rounded, so the export decodes to exactly `CompressedLinear.dequantize()`
(fp16 scales, the default, are stored as they are; see "Scales" below).

Tensors per quantized Linear `<p>` (W [N, K] = [out_features, in_features], b bits, G = K / group_size groups,
G = 1 for group_size -1):

    <p>.qweight  int32 [K·b/32, N]   codes q, packed along in_features
    <p>.qzeros   int32 [G, N·b/32]   zero points minus one (the v1 convention), packed along out_features
    <p>.scales   fp16  [G, N]
    <p>.g_idx    int32 [K]           group of input column k: k // group_size (static groups: no permutation)
    <p>.bias     dtype [N]           when the Linear has one

    W[n, k] = scales[g, n] · (q[k, n] − (qzeros[g, n] + 1)),   g = g_idx[k]

Packing: a run of 32 consecutive values takes exactly b int32 words; value i of the run sits at bit i·b of
that 32·b-bit stream, least significant bit first. For 2, 4 and 8 bits that is 32/b whole values per word;
3-bit values straddle words (32 values = 10 + 1 + 10 + 1 + 10 over 3 words). In and out features must be
multiples of 32 (one run), as GPTQModel's packer requires. Symmetric grids store zero 2^(b−1) like any other
(GPTQ's own symmetric grid: codes 0..2^b − 1 around 2^(b−1)).

The v1 "+1": GPTQ v1 files store zero − 1 and every reader adds 1 back (vLLM's gptq kernels, GPTQModel's
v1 → v2 conversion, which adds 1 to every packed field at once). A group whose zero point is 0 therefore has
no v1 form. `write()` shifts such a group's codes and zero up by one when its codes leave room (exact),
and otherwise refuses the layer, naming it (fix: a symmetric grid, or the compressed-tensors export).

quantization_config (in config.json):
    {quant_method: "gptq", bits, group_size, sym, desc_act: false, lm_head: <is the output head planned>,
     format: "gptq", checkpoint_format: "gptq", pack_dtype: "int32", meta: {quantizer: ["compress:<version>"]},
     dynamic: {...}, modules_in_block_to_quantize: [[...]]}
The top level is the most common setting (by weights); Linears that differ get an entry in GPTQModel's
`dynamic` map, which vLLM, SGLang and GPTQModel read: keys are regular expressions matched with `re.match`
against module names, "+:<regex>" overrides {bits, group_size, sym}, "-:<regex>" leaves the module dense.
q/k/v (and gate/up) share one key that also matches the fused name vLLM gives them (qkv_proj, gate_up_proj):
older vLLM matches the fused name, newer vLLM retries each shard and refuses shards that disagree. When any
Linear is not a Marlin setting (4/8-bit symmetric, group -1/32/64/128), the top level is taken from the
non-Marlin ones, because vLLM chooses its kernel family from the top level and then refuses overrides outside
it (gptq_marlin takes 4/8-bit symmetric only; the `gptq` path takes 2/3/4/8 bits with zero points). Dense
Linears inside the blocks are also listed by omission in `modules_in_block_to_quantize` (full names), which is
how transformers (through optimum) and vLLM skip them.

Scales: GPTQ stores fp16. fp16 scales (LayerSpec.scale_dtype "float16", the default) are written as they are.
bfloat16 scales are converted exactly whenever they lie in fp16's normal range (bf16 keeps 8 significant bits,
fp16 11); float32 scales are rounded to the nearest fp16 (relative error at most 2^-11), and the export then no
longer decodes bit-exactly to the compressed model: `write()` logs the largest relative change and the model
card records it. A scale that overflows fp16 or flushes to zero is an error.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from compress import models
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, Plan
from compress.util import atomic_write

if TYPE_CHECKING:
    from compress.recipe import Recipe

log = logging.getLogger(__name__)

NAME = "gptq"
BITS = (2, 3, 4, 8)  # the widths GPTQ loaders pack (vLLM's gptq path, GPTQModel, transformers' GPTQConfig)
RUN = 32  # values per packed run (b words); in and out features must be multiples of it
MARLIN_TYPES = ((4, True), (8, True))  # (bits, symmetric) that vLLM's gptq_marlin / auto_gptq path takes
MARLIN_GROUPS = (-1, 32, 64, 128)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's fusions
SHARD_BYTES = 4 * 1024**3  # safetensors shard size (an index is written when there are several)
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"

Setting = tuple[int, int, bool]  # (bits, group_size, symmetric) of one GPTQ Linear


# --- what cannot be written -----------------------------------------------------------------------------------

KIND_FIX = {
    "binary": "binary layers (PB-LLM) have no GPTQ form; fix: quantize them (weights.binary=false, "
              "round.method=gptq) or keep them dense (overrides: {match: ..., skip: true})",
    "levels": "per-column levels (BAQ granularity=column) have no GPTQ form; fix: allocate.granularity=layer "
              "or allocate.method=evopress",
    "pruned": "pruned layers (weights.sparsity / pattern) have no GPTQ form (it stores every code); fix: drop "
              "the sparsity, or keep them dense (overrides: {match: ..., skip: true})",
}
MIXED = ("widths differ between the groups of one Linear (BAQ granularity=group) and GPTQ has one width per "
         "Linear; fix: allocate.granularity=layer, or allocate.method=evopress (one width per Linear)")


def setting(spec: LayerSpec) -> Setting | None:
    """(bits, group_size, symmetric) of an affine spec with one width; None for anything GPTQ cannot hold."""
    if spec.kind != "affine":
        return None
    widths = set(spec.bits) if isinstance(spec.bits, tuple) else {spec.bits}
    return (widths.pop(), spec.group_size, spec.symmetric) if len(widths) == 1 else None


def problems(plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None = None,
             dtype: torch.dtype | None = None, config: Any = None) -> list[str]:
    """Every reason `plan` cannot be written as GPTQ or served by vLLM, one line each: the layer(s), the problem
    and the fix. Empty when the plan exports.

    shapes: (out_features, in_features) of every planned Linear. q/k/v and gate/up siblings missing from the
    plan are taken as dense Linears (every architecture in compress.models has the whole sets).
    recipe: the recipe the plan comes from. Pass it to check before calibration, with the recipe's base plan
    (compress.pipeline.make_plan): the widths its allocator (baq, evopress) will choose are then judged from
    the allocator's settings (choices, granularity, tie), and the base plan's placeholder widths are not.
    dtype: unused (GPTQ stores fp16 scales whatever the model dtype).
    """
    return _problems(plan, shapes, recipe, None)


def _problems(plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None,
              exists: Callable[[str], bool] | None) -> list[str]:
    method, cfg = _allocator(recipe)
    free = {n for n in plan if recipe is not None and method and not recipe.pinned(n)}  # widths the allocator sets
    found: dict[str, list[str]] = {}  # problem and fix -> the layers that have it, in plan order
    for name, spec in plan.layers.items():
        N, K = shapes[name]
        if spec.kind != "affine":
            found.setdefault(KIND_FIX[spec.kind], []).append(name)
            continue
        widths = sorted(set(spec.group_bits(K)))
        if len(widths) > 1:
            found.setdefault(MIXED, []).append(name)
            continue
        if name not in free and widths[0] not in BITS:
            found.setdefault(f"{widths[0]}-bit codes, and GPTQ holds 2, 3, 4 or 8 bits; fix: weights.bits (or the "
                             "override's bits) of 2, 3, 4 or 8", []).append(name)
        g = spec.group_size
        if g != -1 and K % g:
            found.setdefault(f"group_size={g} does not divide in_features={K} (each row's last group would be "
                             f"{K % g} wide, and GPTQ loaders need equal groups); fix: weights.group_size="
                             f"{_divisors(K, g)}, or -1 (per row)", []).append(name)
        if K % RUN or N % RUN:
            found.setdefault(f"in_features={K}, out_features={N}: GPTQ packs codes in runs of {RUN} along "
                             f"in_features and zero points along out_features, so both must be multiples of {RUN}; "
                             "fix: keep these Linears dense (overrides: {match: ..., skip: true})", []).append(name)
    lines = [f"{_compact(names)}: {text}" for text, names in found.items()]
    lines += _fused_problems(plan, free, exists)
    if method:
        lines += _allocator_problems(plan, method, cfg, free)
    return lines


def _allocator(recipe: Recipe | None) -> tuple[str, Any]:
    """(method, Config) of an allocator that chooses widths (baq, evopress); ("", None) otherwise."""
    if recipe is None or recipe.allocate.method not in ("baq", "evopress"):
        return "", None
    return recipe.allocate.method, recipe.allocate.config


def _allocator_problems(plan: Plan, method: str, cfg: Any, free: set[str]) -> list[str]:
    """What the allocator will do to the free (unpinned) Linears, judged from its settings alone."""
    if not free:
        return []
    out = []
    choices = sorted(set(cfg.choices))
    bad = [c for c in choices if c not in BITS]
    fused_free = any(sum(m in free for m in members) > 1 for _, _, members in _fused_sets(plan, None))
    if method == "baq":
        if cfg.granularity == "column":
            return ["allocate: baq granularity=column gives every column its own level count, which GPTQ has no "
                    "form for; fix: allocate.granularity=layer, or allocate.method=evopress"]
        if cfg.granularity == "group" and len(choices) > 1:
            out.append("allocate: baq granularity=group gives every group of columns its own width, and GPTQ has one "
                       "width per Linear; fix: allocate.granularity=layer, or allocate.method=evopress")
        if bad:
            out.append(f"allocate: baq choices={choices} include {bad}, and GPTQ holds 2, 3, 4 or 8 bits; fix: "
                       "allocate.choices=[2, 3, 4, 8]")
        if cfg.granularity == "layer" and fused_free and not cfg.tie:
            out.append("allocate: baq granularity=layer gives q_proj/k_proj/v_proj and gate_proj/up_proj widths of "
                       "their own, and vLLM fuses each set into one Linear (qkv_proj, gate_up_proj) with one "
                       "setting; fix: allocate.tie=true")
    else:  # evopress
        if bad:
            out.append(f"allocate: evopress choices={choices} include {bad}, and GPTQ holds 2, 3, 4 or 8 bits; fix: "
                       "allocate.choices=[2, 3, 4] (EvoPress needs consecutive widths), with any 8-bit Linears "
                       "pinned by overrides")
        if not cfg.tie and fused_free:
            out.append("allocate: evopress with tie: false gives q_proj/k_proj/v_proj and gate_proj/up_proj widths "
                       "of their own, and vLLM fuses each set into one Linear (qkv_proj, gate_up_proj) with one "
                       "setting; fix: allocate.tie=true")
    return out


def _fused_sets(names: Iterable[str], exists: Callable[[str], bool] | None) -> list[tuple[str, str, list[str]]]:
    """(parent, fused name, member names) of every q/k/v or gate/up set with a member among `names`."""
    out, seen = [], set()
    for n in names:
        parent, _, leaf = n.rpartition(".")
        for fused, leaves in FUSED.items():
            if leaf in leaves and (parent, fused) not in seen:
                seen.add((parent, fused))
                members = [f"{parent}.{x}" for x in leaves if exists is None or exists(f"{parent}.{x}")]
                out.append((parent, fused, members))
    return out


def _describe(s: Setting) -> str:
    b, g, sym = s
    return f"{b}-bit {'per-row' if g == -1 else f'g{g}'} {'sym' if sym else 'asym'}"


def _fused_problems(plan: Plan, free: set[str], exists: Callable[[str], bool] | None) -> list[str]:
    """Fused sets whose members differ (a setting, or dense against quantized): one line per kind of set."""

    def member(m: str) -> str:
        spec = plan.layers.get(m)
        if spec is None:
            return "dense"
        s = setting(spec)
        if s is None:
            return spec.kind if spec.kind != "affine" else "mixed widths"
        return f"allocated-width {_describe(s).split(' ', 1)[1]}" if m in free else _describe(s)

    bad: dict[str, list[tuple[str, str]]] = {}
    for parent, fused, members in _fused_sets(plan, exists):
        seen = [member(m) for m in members]
        if len(set(seen)) > 1:
            desc = ", ".join(f"{m.rpartition('.')[2]} {s}" for m, s in zip(members, seen, strict=True))
            bad.setdefault(fused, []).append((parent, desc))
    lines = []
    for fused, sets in bad.items():
        leaves = FUSED[fused]
        more = f"; {len(sets) - 1} more sets" if len(sets) > 1 else ""
        lines.append(f"{_compact([p for p, _ in sets])}.{{{','.join(leaves)}}}: vLLM fuses {'/'.join(leaves)} into "
                     f"one {fused} with one setting, but they differ ({sets[0][0]}: {sets[0][1]}{more}); fix: give "
                     "them the same bits, group_size and symmetric in overrides (or skip all of them), or allocate "
                     "with evopress tie: true")
    return lines


def _divisors(K: int, g: int) -> str:
    """Group sizes near g that divide K: the largest power of two below g, and the next multiple of 64 above."""
    below = next((d for d in (2**i for i in range(g.bit_length(), 4, -1)) if d < g and K % d == 0), None)
    above = next((d for d in range(g + 1, K + 1) if K % d == 0 and d % 64 == 0), None)
    found = [str(d) for d in (below, above) if d is not None]
    return " or ".join(found) if found else str(K)


def _compact(names: list[str]) -> str:
    """Layer names, shortened: block indices folded ("model.layers.{0-3,7}.mlp.down_proj"), then the leaves of one
    set of blocks ("model.layers.{0-1}.self_attn.{q_proj,k_proj}")."""
    by_leaf: dict[tuple[str, str], list[int]] = {}
    plain = []
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m is None:
            plain.append(n)
            continue
        by_leaf.setdefault((n[: m.start()], n[m.end():]), []).append(int(m.group(1)))
    by_blocks: dict[tuple[str, str, str], list[str]] = {}  # (prefix, blocks, parent of the leaf) -> leaves
    for (prefix, leaf), idx in by_leaf.items():
        parent, _, last = leaf.rpartition(".")
        by_blocks.setdefault((prefix, _ranges(idx), parent), []).append(last)
    parts = []
    for (prefix, blocks, parent), leaves in by_blocks.items():
        b = blocks if "," not in blocks and "-" not in blocks else f"{{{blocks}}}"
        tail = leaves[0] if len(leaves) == 1 else f"{{{','.join(leaves)}}}"
        parts.append(".".join(x for x in (prefix, b, parent, tail) if x))
    parts += plain
    return ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")


def _ranges(idx: list[int]) -> str:
    idx = sorted(set(idx))
    out, start = [], idx[0]
    for a, b in zip(idx, [*idx[1:], None], strict=True):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


# --- packing --------------------------------------------------------------------------------------------------

def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Integers [R, C] in [0, 2**bits), R a multiple of 32 -> int32 [R·bits/32, C]: each run of 32 values down a
    column fills `bits` words, value i at bit i·bits of the run, least significant bit first."""
    R, C = values.shape
    if R % RUN:
        raise ValueError(f"{R} rows do not make whole runs of {RUN}")
    runs = values.to(torch.int64).reshape(R // RUN, RUN, C)
    words = torch.zeros(R // RUN, bits, C, dtype=torch.int64, device=values.device)
    for i in range(RUN):
        w, off = divmod(i * bits, 32)
        v = runs[:, i]
        words[:, w] |= (v << off) & 0xFFFFFFFF
        if off + bits > 32:  # the value straddles into the next word (3 bits: i = 10, 21)
            words[:, w + 1] |= v >> (32 - off)
    words = words.reshape(R // RUN * bits, C)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _layer(name: str, m: CompressedLinear, dtype: torch.dtype) -> tuple[dict[str, Tensor], int, float]:
    """GPTQ tensors of one Linear, the number of its groups with no v1 form, and the largest relative change of
    a scale from its conversion to fp16."""
    s = setting(m.spec)
    if s is None:
        raise CompressError(f"{name}: {m.spec.kind} layer with widths {m.spec.bits} has no GPTQ form")
    b, _, _ = s
    N, K = m.out_features, m.in_features
    G, gw = m.spec.groups(K), m.spec.group_width(K)
    d = m.decoded()
    codes = d.codes.to("cpu", torch.int64)
    zero = d.zero.to("cpu").round().to(torch.int64)
    scale = d.scale.to("cpu", torch.float32)
    low = zero == 0  # v1 stores zero - 1: move such a group up by one code where its codes leave room
    if bool(low.any()):
        room = codes.reshape(N, G, gw).amax(-1) < 2**b - 1
        shift = low & room
        codes = codes + shift.repeat_interleave(gw, dim=1)
        zero = zero + shift
    unrepresentable = int((zero == 0).sum())
    half = scale.to(torch.float16)
    if not bool(torch.isfinite(half).all()) or bool(((half == 0) & (scale != 0)).any()):
        raise CompressError(f"{name}: scales outside fp16's range (GPTQ stores fp16 scales); fix: "
                            "weights.scale_dtype=float16")
    err = float(((half.float() - scale).abs() / scale.abs().clamp_min(1e-30)).max()) if scale.numel() else 0.0
    out = {"qweight": pack_rows(codes.T, b),
           "qzeros": pack_rows((zero - 1).clamp_min(0), b).T.contiguous(),
           "scales": half.T.contiguous(),
           "g_idx": (torch.arange(K) // gw).to(torch.int32)}
    if m.bias is not None:
        out["bias"] = m.bias.detach().to("cpu", dtype)
    return out, unrepresentable, err


def layer_tensors(m: CompressedLinear, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """qweight, qzeros, scales, g_idx (and bias, in `dtype`) of one compressed Linear, as `write()` stores them."""
    out, bad, _ = _layer("this layer", m, dtype)
    if bad:
        raise CompressError(_zero_error([("this layer", bad)]))
    return out


def _zero_error(bad: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in bad)
    return (f"{_compact([n for n, _ in bad])}: {total} groups have zero point 0 and use the top code, which GPTQ v1 "
            "cannot store (it writes zero - 1); fix: weights.symmetric=true, or export compressed-tensors")


# --- the quantization_config ----------------------------------------------------------------------------------

def _marlin(s: Setting) -> bool:
    return (s[0], s[2]) in MARLIN_TYPES and s[1] in MARLIN_GROUPS


def _base(settings: Mapping[str, Setting], shapes: Mapping[str, tuple[int, int]]) -> Setting:
    """The top-level setting: the most common by weights, among the non-Marlin settings when there are any."""
    weight: dict[Setting, int] = {}
    for n, s in settings.items():
        weight[s] = weight.get(s, 0) + shapes[n][0] * shapes[n][1]
    candidates = [s for s in weight if not _marlin(s)] or list(weight)
    return max(candidates, key=weight.__getitem__)


def _units(names: list[str]) -> list[list[str]]:
    """Module names grouped the way vLLM loads them: each fused q/k/v or gate/up set together, in order."""
    present, done, out = set(names), set(), []
    for n in names:
        if n in done:
            continue
        parent, _, leaf = n.rpartition(".")
        unit = [n]
        for leaves in FUSED.values():
            if leaf in leaves:
                unit = [f"{parent}.{x}" for x in leaves if f"{parent}.{x}" in present]
        done.update(unit)
        out.append(unit)
    return out


def _key(unit: list[str]) -> str:
    """An anchored regex matching the unit's modules and, for a fused set, vLLM's fused name."""
    parent, _, leaf = unit[0].rpartition(".")
    fused = next((f for f, leaves in FUSED.items() if leaf in leaves), None)
    if fused is None:
        return f"^{re.escape(unit[0])}$"
    alts = [u.rpartition(".")[2] for u in unit] + [fused]
    return f"^{re.escape(parent)}\\.(?:{'|'.join(alts)})$"


def quantization_config(plan: Plan, shapes: Mapping[str, tuple[int, int]], dense: Iterable[str] = (),
                        order: Iterable[str] | None = None) -> dict[str, Any]:
    """The `quantization_config` of an exportable plan (problems() empty): the top-level setting, `dynamic`
    entries for the Linears that differ from it ("+:") and for the dense Linears of the blocks ("-:"), and
    `modules_in_block_to_quantize` when some are dense. `order`: module order for the entries (default: plan
    order, then `dense`)."""
    from compress import __version__

    dense = [n for n in dense if n not in plan]
    settings = {n: setting(s) for n, s in plan.layers.items()}
    if any(s is None for s in settings.values()):
        raise CompressError("the plan has Linears GPTQ cannot hold; see gptq.problems()")
    base = _base(settings, shapes)  # type: ignore[arg-type]
    names = list(order) if order is not None else [*plan, *dense]
    names = [n for n in names if n in plan or n in dense]
    dynamic: dict[str, dict[str, Any]] = {}
    for unit in _units(names):
        s = settings.get(unit[0])
        if s is None:
            dynamic[f"-:{_key(unit)}"] = {}
        elif s != base:
            dynamic[f"+:{_key(unit)}"] = {"bits": s[0], "group_size": s[1], "sym": s[2]}
    qc: dict[str, Any] = {
        "quant_method": "gptq", "bits": base[0], "group_size": base[1], "sym": base[2], "desc_act": False,
        "lm_head": plan.head is not None, "format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": [f"compress:{__version__}"], "static_groups": True},
    }
    if dynamic:
        qc["dynamic"] = dynamic
    if dense:
        qc["modules_in_block_to_quantize"] = [[n for n in names if n in plan and n != plan.head]]
    return qc


# --- the checkpoint folder ------------------------------------------------------------------------------------

def write(model: nn.Module, tokenizer: Any, plan: Plan, out: Path, *, dtype: torch.dtype,
          recipe: Recipe | None = None) -> None:
    """Write `model` (its planned Linears `CompressedLinear`s, e.g. from `compress.load(dir)`) as a GPTQ v1
    Hugging Face checkpoint in `out`: config.json with the GPTQ quantization_config, model.safetensors (sharded
    with an index above SHARD_BYTES) holding qweight/qzeros/scales/g_idx (+ bias) per planned Linear and every
    other tensor in `dtype`, generation_config.json, the tokenizer and a README.md card. Raises CompressError
    (one line) when the plan cannot be written (problems()) or a group has no v1 form."""
    out = Path(out)
    if not len(plan):
        raise CompressError("the plan names no Linear: there is nothing to write as GPTQ")
    arch = models.arch_of(model)
    block_linears = [f"{arch.blocks}.{n}" for n, m in models.blocks_of(model, arch).named_modules()
                     if isinstance(m, nn.Linear | CompressedLinear)]
    modules: dict[str, CompressedLinear] = {}
    for name in plan:
        m = model.get_submodule(name)
        if not isinstance(m, CompressedLinear):
            raise CompressError(f"{name} is a {type(m).__name__}, not a CompressedLinear; write() exports a compressed "
                                "model (compress.load(DIR), or the model compress.compress() returns)")
        if m.spec != plan[name]:
            raise CompressError(f"{name}: the plan says {plan[name]} but the model holds {m.spec}; pass the "
                                "model's own plan")
        modules[name] = m
    shapes = {n: (m.out_features, m.in_features) for n, m in modules.items()}
    present = set(block_linears) | set(plan)
    lines = _problems(plan, shapes, None, present.__contains__)
    if lines:
        raise CompressError("this plan cannot be written as GPTQ: " + " | ".join(lines))

    tensors: dict[str, Tensor] = {}
    bad: list[tuple[str, int]] = []
    worst = (0.0, "")
    for name, m in modules.items():
        t, n_bad, err = _layer(name, m, dtype)
        if n_bad:
            bad.append((name, n_bad))
        worst = max(worst, (err, name))
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
    if bad:
        raise CompressError(_zero_error(bad))
    if plan.head is not None:
        log.warning("this GPTQ export rounds the output head (lm_head: true): vLLM reads it, transformers does not "
                    "(it initialises lm_head at random); compress with weights.lm_head=false for transformers")
    if worst[0] > 0:
        log.warning("GPTQ stores fp16 scales: converting this model's scales changed them by up to %.3g (relative, "
                    "in %s); the export is not bit-exact", worst[0], worst[1])

    planned = tuple(f"{n}." for n in plan)
    storages: set[tuple[int, int, tuple[int, ...]]] = set()
    for k, v in model.state_dict().items():
        if k.startswith(planned):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if v.numel() and key in storages:  # a tied weight (lm_head = embed_tokens): the loader ties it again
            continue
        storages.add(key)
        v = v.detach().to("cpu")
        tensors[k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()

    dense = [n for n in block_linears if n not in plan]
    qc = quantization_config(plan, shapes, dense, order=block_linears + [n for n in plan if n not in block_linears])
    out.mkdir(parents=True, exist_ok=True)
    _save(tensors, out)
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    config.dtype = dtype
    config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    text = card(qc, plan, shapes, dense, getattr(model.config, "_name_or_path", "") or "", worst)
    atomic_write(out / "README.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save(tensors: dict[str, Tensor], out: Path) -> None:
    """model.safetensors, or shards of at most SHARD_BYTES with an index (earlier weight files are removed)."""
    for old in [*out.glob("model*.safetensors"), out / INDEX]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / WEIGHTS, lambda tmp: save_file(shards[0], tmp, metadata=meta))
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(out / fname, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    atomic_write(out / INDEX, lambda tmp: tmp.write_text(index, encoding="utf-8"))


def card(qc: Mapping[str, Any], plan: Plan, shapes: Mapping[str, tuple[int, int]], dense: list[str], source: str,
         scale_change: tuple[float, str] = (0.0, "")) -> str:
    """The README.md of an export: what it holds, and which runtimes read it with which kernels."""
    from compress import __version__

    weight: dict[Setting, list[int]] = {}
    for n, spec in plan.layers.items():
        s = setting(spec)
        if s is not None:
            w = weight.setdefault(s, [0, 0])
            w[0] += 1
            w[1] += shapes[n][0] * shapes[n][1]
    total = sum(w[1] for w in weight.values()) or 1
    rows = "\n".join(f"| {_describe(s)} | {c} | {100 * n / total:.1f}% |"
                     for s, (c, n) in sorted(weight.items(), key=lambda kv: -kv[1][1]))
    base = (qc["bits"], qc["group_size"], qc["sym"])
    mixed = len(weight) > 1
    marlin = all(_marlin(s) for s in weight)
    bits = sorted({s[0] for s in weight})
    vllm = ("all Linears are 4/8-bit symmetric with group size -1/32/64/128, so vLLM takes its Marlin GPTQ path "
            "(`gptq_marlin`, `auto_gptq` in newer releases; the kernel is chosen per device: Marlin or Machete on "
            "NVIDIA GPUs, the CPU WNA16 kernels on CPU), fp16 or bf16 activations" if marlin else
            "not every Linear is 4/8-bit symmetric with group size -1/32/64/128 (widths here: "
            f"{', '.join(map(str, bits))}), so vLLM takes its `gptq` path (the ExLlama-derived `gptq_gemm` CUDA "
            "kernel, 2/3/4/8 bits with zero points), which wants fp16 activations: `vllm serve DIR --dtype float16`. "
            "Humming-based releases can also serve 2/3-bit GPTQ")
    hf = ("`AutoModelForCausalLM.from_pretrained(DIR)` with `optimum` and `gptqmodel` installed: optimum builds "
          "GPTQModel's QuantLinear for every block Linear (its Torch kernel on CPU; Marlin/ExLlama/Triton kernels "
          "on GPU)" + (" and skips the dense ones through `modules_in_block_to_quantize`" if dense else ""))
    if mixed:
        hf = ("not readable: transformers builds every block Linear at the top-level width through optimum, which "
              "ignores the per-module `dynamic` map; load it with GPTQModel, vLLM or SGLang")
    if plan.head is not None:
        hf = (f"not readable: transformers' GPTQ loader ignores `lm_head: true`, keeps {plan.head} a plain Linear and "
              "initialises its weight at random (its logits are unrelated to the model's); load it with vLLM, or "
              "compress with weights.lm_head=false for an export transformers reads")
    gm = ("" if base[2] else
          " GPTQModel refuses a v1 checkpoint with a `sym: false` top level unless `meta.quantizer` names gptqmodel "
          ">= 0.9.0 (a guard against old AutoGPTQ files whose zero points overflowed): this file's zero points are "
          f"written correctly, but GPTQModel.load refuses it; use vLLM{'' if mixed else ' or transformers'}")
    scales = ("fp16, exactly the compressed model's scales (bit-exact export)" if scale_change[0] == 0 else
              f"fp16, rounded from the compressed model's scales (largest relative change {scale_change[0]:.3g}, in "
              f"{scale_change[1]}): the export is not bit-exact")
    return f"""# GPTQ export{f' of {source}' if source else ''}

A GPTQ v1 checkpoint (`quant_method: gptq`, `checkpoint_format: gptq`) written by compress {__version__} from a
compressed model: the codes, scales and zero points are the compressed model's own, not re-quantized. Static
groups (`desc_act: false`, `g_idx[k] = k // group_size`); zero points stored minus one (the v1 convention).

| setting | Linears | share of weights |
|---|---|---|
{rows}

Top level: {_describe(base)}.{' Linears that differ are listed in `dynamic` (GPTQModel per-module regex map).'
                                if mixed else ''}{f' Dense block Linears (`-:` in `dynamic`): {len(dense)}.'
                                                   if dense else ''}
Scales: {scales}.

## Runtimes

- **vLLM**: {vllm}. q/k/v and gate/up carry one setting each, as vLLM fuses them.
- **SGLang**: reads the same `gptq` / `gptq_marlin` configs, `dynamic` included.
- **GPTQModel**: `GPTQModel.load(DIR)` (honours `dynamic`; converts v1 zero points to its v2 form on load).{gm}
- **transformers**: {hf}.
"""
