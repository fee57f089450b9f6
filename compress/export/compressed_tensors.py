"""Export to compressed-tensors `pack-quantized`: the INT weight-only checkpoint that transformers (with the
`compressed-tensors` package) and vLLM load without `compress`.

What a planned Linear `<p>` (weight W [N, K] = [out, in], b bits) becomes, from its codes c ∈ [0, 2^b), scale
s and zero point z (W_hat = s·(c − z), compress/codecs/affine.py):

    <p>.weight_packed      int32 [N, ceil(K·b/32)] ("dense") or [N, ceil(K/(32//b))] ("padded")
    <p>.weight_scale       `dtype` [N, G] (group strategy, G = K/g) or [N, 1] (channel strategy, g = -1)
    <p>.weight_zero_point  int32 [ceil(N·b/32), G] (dense) or [ceil(N/(32//b)), G] (padded), asymmetric only
    <p>.weight_shape       int64 [2] = [N, K]
    <p>.bias               `dtype`, when the Linear has one

compressed-tensors stores signed values q = c − 2^(b−1) and its packer adds 2^(b−1) back before writing the
bits, so the stored bit fields are exactly our unsigned codes (and zero points); it dequantizes
(q − z_signed)·s = (c − z)·s, our W_hat. A symmetric grid (z = 2^(b−1) for every group) stores no zero point.
Our act-order is GPTQ with static groups, so no `weight_g_idx` is written (`actorder` null).

Layouts (read from `compressors/pack_quantized/helpers.py` of the released wheels):
    "dense"   compressed-tensors >= 0.18.0 (PR #732, "CT support for humming"; 0.18.0-0.20.1 identical):
              value i of a row sits at bit i·b of the row's bit stream, LSB first (word i·b//32, offset
              i·b%32); values straddle words, 32 values fill exactly b words.
    "padded"  compressed-tensors <= 0.17.x (0.17.0 and 0.17.1 identical): 32//b values per int32 word, value i
              at word i//(32//b), bit (i % (32//b))·b, the high 32 mod b bits of every word zero.
For b in {1, 2, 4, 8} both layouts are the same bytes; for b in {3, 5, 6, 7} they differ, and each reader
decodes only its own. Clients: vLLM's GPU builds that serve 2/3-bit (Humming, vLLM PR #46389) and
transformers with compressed-tensors >= 0.18 expect "dense" (the default); vLLM's CPU build pins
compressed-tensors 0.17.0, and transformers with 0.17.x installed decodes "padded". The CPU kernels only
take 4-bit, whose bytes are layout-independent, so "padded" matters for transformers + 0.17 at 3/5/6/7 bits.

Exactness of the scales: transformers and vLLM create `weight_scale` in the model's dtype and copy the file
into it, and compressed-tensors dequantizes in the scale's dtype. With a float32 model the decoded weight is
exactly our W_hat; with float16 (bfloat16) it is W_hat rounded once to float16 (bfloat16), as our own layers
give in that dtype, provided the scales are float16 (bfloat16) already. Scales that `dtype` cannot hold
(float16 scales in a bfloat16 export, float32 scales in a 16-bit one) are rounded by every loader, so
`write` refuses them unless `exact=False` (fix: export in float32 or in the scales' dtype, or compress with
`weights.scale_dtype` set to the serving dtype).

Group sizes must divide in_features: compressed-tensors' own decompressor (0.17 to 0.20) raises "tensor
column shape must be divisible by the given group_size" on a narrower last group (SmolLM2: K = 576 with
g128), llm-compressor refuses it at initialization and vLLM's kernels assume whole groups, so `problems`
refuses it with the group sizes that divide.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, Plan

if TYPE_CHECKING:
    from compress.recipe import Recipe

NAME = "compressed-tensors"
FORMAT = "pack-quantized"
LAYOUTS = ("dense", "padded")
VERSIONS = {"dense": "0.20.1", "padded": "0.17.0"}  # quantization_config.version: the release whose layout we write
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM merges these
SHOWN = 3  # names listed per problem line before "and N more"

Scheme = tuple[int, int, bool]  # (bits, group_size (-1 = channel), symmetric): one config group each


# --- what cannot be exported ---------------------------------------------------------------------------------

KIND = {
    "binary": ("compressed-tensors cannot hold binary (PB-LLM) layers (signs + salient part)",
               "use a quantized recipe (e.g. gptq-2bit) or an override {binary: false, bits: 2}"),
    "levels": ("compressed-tensors cannot hold per-column level counts (BAQ granularity=column)",
               "use allocate granularity=layer with tie: true, or evopress with tie: true"),
    "pruned": ("compressed-tensors cannot hold pruned layers (its sparse formats were removed in 0.15 and "
               "vLLM refuses sparsity)", "use weights.sparsity=0 (and pattern: unstructured)"),
}
MIXED = ("widths differ between the groups of one Linear (BAQ granularity=group); compressed-tensors has one "
         "width per Linear", "use allocate granularity=layer with tie: true, or evopress with tie: true")


def scheme(spec: LayerSpec, K: int) -> Scheme:
    """The config group a single-width affine layer belongs to."""
    return spec.group_bits(K)[0], spec.group_size, spec.symmetric


def describe(s: Scheme | None) -> str:
    """w4 g128 asym, w3 channel sym, dense."""
    if s is None:
        return "dense"
    b, g, sym = s
    return f"w{b} {'channel' if g == -1 else f'g{g}'} {'sym' if sym else 'asym'}"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown} and {len(names) - SHOWN} more"


def _group_fix(g: int, Ks: Sequence[int]) -> str:
    """The group sizes near g that divide every in_features, e.g. 'weights.group_size=64 or 192, or -1': the
    largest power of two below g and the smallest multiple of 32 above it."""
    common = math.gcd(*Ks)
    below = max((2**i for i in range(4, 13) if 2**i < g and common % 2**i == 0), default=None)
    above = min((d for d in range(32 * (g // 32 + 1), common + 1, 32) if common % d == 0), default=None)
    sizes = " or ".join(str(d) for d in (below, above) if d)
    return f"weights.group_size={sizes}, or -1 (per channel)" if sizes else "weights.group_size=-1 (per channel)"


def _exportable(spec: LayerSpec, K: int) -> bool:
    return spec.kind == "affine" and len(set(spec.group_bits(K))) == 1 and (
        spec.group_size == -1 or K % spec.group_size == 0)


def problems(plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None = None,
             dtype: torch.dtype | None = None, config: Any = None) -> list[str]:
    """Every reason this plan cannot be exported to compressed-tensors and served by vLLM, one line each:
    the Linears (the first few and a count), the problem, the fix. Empty when `write` will succeed.

    `shapes` maps every planned Linear (and may map the dense ones too) to (out_features, in_features). A
    sibling of a fused set (q/k/v, gate/up) missing from the plan is taken to be a dense Linear. With a
    `recipe`, what its allocator will do is checked too (BAQ per-group or per-column widths, EvoPress
    without `tie`), so the check can run before calibration on the recipe's base plan. With a `dtype` (the
    export's model dtype) the scales are checked against it too (`dtype_problems`)."""
    found: dict[tuple[str, str], list[str]] = {}

    def add(name: str, problem: str, fix: str) -> None:
        found.setdefault((problem, fix), []).append(name)

    Ks = [shapes[n][1] for n in plan]
    for name, spec in plan.layers.items():
        K = shapes[name][1]
        if spec.kind != "affine":
            add(name, *KIND[spec.kind])
        elif len(set(spec.group_bits(K))) > 1:
            add(name, *MIXED)
        elif spec.group_size != -1 and K % spec.group_size:
            add(name, f"group_size={spec.group_size} does not divide in_features={K} (a narrower last group): "
                      "compressed-tensors' decompressor raises 'tensor column shape must be divisible by the given "
                      "group_size' and vLLM's kernels need whole groups", _group_fix(spec.group_size, Ks))

    parents: dict[str, set[str]] = {}
    for name in plan:
        parent, _, leaf = name.rpartition(".")
        parents.setdefault(parent, set()).add(leaf)
    unfused: list[tuple[str, str]] = []  # (the fused set, its shards' schemes)
    for parent, leaves in parents.items():
        for fused in FUSED.values():
            if not leaves & set(fused):
                continue
            members = [f"{parent}.{leaf}" if parent else leaf for leaf in fused]
            schemes = {m: (describe(scheme(plan[m], shapes[m][1])) if m in plan and _exportable(plan[m], shapes[m][1])
                           else plan[m].kind if m in plan else "dense") for m in members}
            if len(set(schemes.values())) > 1:
                unfused.append((f"{parent}.{'/'.join(fused)}",
                                ", ".join(f"{m.rpartition('.')[2]} {s}" for m, s in schemes.items())))
    for names, _ in unfused:
        add(names, f"vLLM fuses q/k/v into qkv_proj and gate/up into gate_up_proj and refuses shards with different "
                   f"schemes (e.g. {unfused[0][1]})",
            "give them one scheme: allocate evopress with tie: true, or one override matching all of them")

    if plan.head is not None:  # (vLLM quantizes LinearBase layers only: its ParallelLMHead would not load packed)
        add(plan.head, "vLLM serves a compressed-tensors output head only dense (its lm_head is no quantizable "
                       "Linear there)", "weights.lm_head=false, or export --format gptq or gguf")
    if recipe is not None:
        where = f"recipe {recipe.name}"
        method, cfg = recipe.allocate.method, recipe.allocate.config
        if method == "baq" and cfg.granularity == "column":
            add(where, f"allocate baq granularity=column gives every column its own level count; {KIND['levels'][0]}",
                KIND["levels"][1])
        elif method == "baq" and cfg.granularity == "group" and len(set(cfg.choices)) > 1:
            add(where, f"allocate baq granularity=group gives the groups of one Linear different widths "
                       f"({'/'.join(map(str, cfg.choices))}); compressed-tensors has one width per Linear",
                "use allocate granularity=layer with tie: true, or evopress with tie: true")
        elif method == "baq" and cfg.granularity == "layer" and len(set(cfg.choices)) > 1 and not cfg.tie:
            add(where, "allocate baq granularity=layer gives q/k/v and gate/up their own widths, which vLLM refuses "
                       "on the shards it fuses", "set allocate.tie=true")
        elif method == "evopress" and not cfg.tie:
            add(where, "allocate evopress with tie: false gives q/k/v and gate/up their own widths, which vLLM "
                       "refuses on the shards it fuses", "set allocate.tie=true")
    return ([f"{_names(names)}: {problem}; fix: {fix}" for (problem, fix), names in found.items()]
            + (dtype_problems(plan, dtype) if dtype is not None else []))


def dtype_problems(plan: Plan, dtype: torch.dtype) -> list[str]:
    """Where `dtype` cannot hold the plan's scales exactly (loaders cast `weight_scale` to the model dtype)."""
    if dtype not in DTYPES:
        return [f"dtype {dtype} is not a compressed-tensors model dtype; use float16, bfloat16 or float32"]
    bad: dict[str, list[str]] = {}
    for name, spec in plan.layers.items():
        s = spec.torch_scale_dtype
        exact = s == dtype or dtype == torch.float32 or (s == torch.bfloat16 and dtype == torch.float16)
        if not exact:  # bf16 -> fp16 is exact in fp16's normal range (8 significant bits into 11; `write` checks)
            bad.setdefault(spec.scale_dtype, []).append(name)
    d = str(dtype).removeprefix("torch.")
    return [f"{_names(names)}: {s} scales are rounded to {d} by transformers and vLLM (they build weight_scale in "
            f"the model dtype); fix: export with dtype float32 or {s}, or compress with weights.scale_dtype={d}"
            for s, names in bad.items()]


# --- packing -----------------------------------------------------------------------------------------------

def _to_int32(words: Tensor) -> Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: Tensor, bits: int, layout: str = "dense") -> Tensor:
    """Unsigned values [R, C] in [0, 2^bits) -> int32 [R, words] along dim 1, as compressed-tensors'
    `pack_to_int32` writes them (it adds 2^(b−1) to its signed values first; ours are already unsigned)."""
    if layout not in LAYOUTS:
        raise CompressError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")
    v = values.to(torch.int64).cpu()
    R, C = v.shape
    if layout == "padded":
        per = 32 // bits
        Cp = math.ceil(C / per) * per
        v = torch.nn.functional.pad(v, (0, Cp - C)).view(R, Cp // per, per)
        return _to_int32((v << (torch.arange(per, dtype=torch.int64) * bits)).sum(dim=-1))
    Cp = math.ceil(C / 32) * 32
    v = torch.nn.functional.pad(v, (0, Cp - C))
    start = torch.arange(Cp, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    out = torch.zeros(R, Cp * bits // 32 + 1, dtype=torch.int64)
    out.index_add_(1, word, (v << offset) & 0xFFFFFFFF)  # disjoint bit fields: adding is OR
    out.index_add_(1, word + 1, v >> (32 - offset))  # the part that straddles into the next word (0 if none)
    return _to_int32(out[:, : math.ceil(C * bits / 32)])


def layer_tensors(m: CompressedLinear, dtype: torch.dtype, layout: str = "dense") -> dict[str, Tensor]:
    """The compressed-tensors tensors of one packed affine Linear (names without the module prefix; no bias)."""
    spec, N, K = m.spec, m.out_features, m.in_features
    if not _exportable(spec, K):
        raise CompressError(f"a {spec.kind} layer with bits={spec.bits}, group_size={spec.group_size} and "
                            f"in_features={K} cannot be exported to compressed-tensors (see problems())")
    b = spec.group_bits(K)[0]
    d = m.decoded()
    out = {"weight_packed": pack(d.codes, b, layout), "weight_scale": d.scale.detach().cpu().to(dtype).contiguous(),
           "weight_shape": torch.tensor([N, K], dtype=torch.int64)}
    if not spec.symmetric:
        out["weight_zero_point"] = pack(d.zero.cpu().to(torch.uint8).T, b, layout).T.contiguous()
    return out


# --- the checkpoint ------------------------------------------------------------------------------------------

def _targets(names: list[str], linears: Sequence[str]) -> list[str]:
    """Module-name targets of one config group: `re:.*\\.<tail>$` for a tail (what follows the block index,
    e.g. self_attn.q_proj) that this group holds in every block, the exact names otherwise."""
    def tail(n: str) -> str | None:
        parts = n.split(".")
        i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        return ".".join(parts[i + 1 :]) if i is not None and i + 1 < len(parts) else None

    mine = set(names)
    out: list[str] = []
    done: set[str] = set()
    for n in names:
        t = tail(n)
        if n in done:
            continue
        pattern = f"re:.*\\.{re.escape(t)}$" if t else None
        matched = [x for x in linears if pattern and re.match(pattern[3:], x)]
        if pattern and len(matched) > 1 and set(matched) <= mine:
            out.append(pattern)
            done.update(matched)
        else:
            out.append(n)
            done.add(n)
    return out


def _weights_args(s: Scheme) -> dict[str, Any]:
    b, g, sym = s
    return {"num_bits": b, "type": "int", "symmetric": sym, "group_size": None if g == -1 else g,
            "strategy": "channel" if g == -1 else "group", "dynamic": False}


def quantization_config(plan: Plan, shapes: Mapping[str, tuple[int, int]], linears: Sequence[str],
                        layout: str = "dense") -> dict[str, Any]:
    """config.json's `quantization_config`, as compressed-tensors' `ModelCompressor.update_config` writes it:
    one config group per (bits, group size, symmetry), module-name targets, every other Linear in `ignore`."""
    groups: dict[Scheme, list[str]] = {}
    for name, spec in plan.layers.items():
        groups.setdefault(scheme(spec, shapes[name][1]), []).append(name)
    config_groups = {
        f"group_{i}": {"targets": _targets(groups[s], linears), "weights": _weights_args(s),
                       "input_activations": None, "output_activations": None, "format": FORMAT}
        for i, s in enumerate(sorted(groups))}
    return {"config_groups": config_groups, "format": FORMAT, "global_compression_ratio": None,
            "ignore": [n for n in linears if n not in plan], "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": VERSIONS[layout]}


def _kernels(s: Scheme) -> str:
    """Which vLLM kernels take a config group (interop.md §B)."""
    b, g, sym = s
    marlin_g = g in (-1, 32, 64, 128)
    machete_g = g in (-1, 128)
    if b == 4 and sym:
        k = ["Marlin (uint4b8, SM75+)" if marlin_g else None, "Machete (Hopper)" if machete_g else None,
             "Exllama (fp16 activations)", "TritonW4A16", "CPUWNA16 on vLLM's CPU build (in, out % 32)"]
    elif b == 8 and sym:
        k = ["Marlin (uint8b128, SM75+)" if marlin_g else None, "Machete (Hopper)" if machete_g else None,
             "Exllama (fp16 activations)"]
    elif b == 4:
        k = ["Marlin (uint4 + zero points, SM75+)" if marlin_g else None,
             "Machete (Hopper)" if machete_g else None, "Conch (SM80+)" if machete_g else None, "TritonW4A16",
             "CPUWNA16 on vLLM's CPU build (in, out % 32)"]
    elif b == 8:
        k = ["Machete (Hopper)" if machete_g else None, "Conch (SM80+, conch-triton-kernels)" if machete_g else None]
    else:
        k = ["Humming (CUDA SM75+, the `humming` package, vLLM with PR #46389, dense layout)"]
    names = [x for x in k if x]
    return ", ".join(names) if names else "none: choose group size -1, 32, 64 or 128"


def card(plan: Plan, shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, layout: str) -> str:
    """README.md: what the checkpoint holds, which runtimes load it and with which kernels."""
    groups: dict[Scheme, int] = {}
    for name, spec in plan.layers.items():
        s = scheme(spec, shapes[name][1])
        groups[s] = groups.get(s, 0) + 1
    d = str(dtype).removeprefix("torch.")
    odd = sorted({s[0] for s in groups if s[0] not in (1, 2, 4, 8)})
    lines = [
        "# compressed-tensors export", "",
        f"Exported by `compress` to compressed-tensors `{FORMAT}` (INT weight-only, {layout} packing, dense tensors "
        f"and scales in {d}); the codes, scales and zero points are the compressed checkpoint's, unchanged.", "",
        "| config group | Linears | vLLM kernels |", "|---|---|---|",
        *[f"| {describe(s)} | {n} | {_kernels(s)} |" for s, n in sorted(groups.items())], "",
        "## Load", "",
        "- **transformers** with `pip install compressed-tensors` (>= 0.18 for the dense layout, 0.17 for the "
        "padded one): `AutoModelForCausalLM.from_pretrained(DIR)`; compressed-tensors keeps the weights packed and "
        "decompresses them to dense on the first forward pass (no quantized kernel).",
        "- **vLLM**: `vllm serve DIR` (scheme `CompressedTensorsWNA16`). 4/8-bit groups run on Marlin (Ampere/Ada) or "
        "Machete (Hopper); other widths need the Humming kernel (CUDA SM75+, the external `humming` package). The "
        "CPU build (compressed-tensors 0.17.0) serves 4-bit groups only (CPUWNA16, in/out features multiples of 32).",
        "- With tensor parallelism the group size must also divide every shard's in_features.",
    ]
    if odd:
        lines.append(f"- {'/'.join(map(str, odd))}-bit packing differs between compressed-tensors <= 0.17 (padded: "
                     f"32//b values per word) and >= 0.18 (dense); this folder uses the {layout} layout.")
    lines += ["", f"Decoded weights equal the compressed model's exactly when loaded in float32, and are its "
              f"weights rounded once to {d} in {d} (loaders build weight_scale in the model dtype).", ""]
    return "\n".join(lines)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | CompressedLinear)]


def write(model: nn.Module, tokenizer: Any, plan: Plan, out: Path, *, dtype: torch.dtype, layout: str = "dense",
          exact: bool = True, max_shard_size: str = "4GB", recipe: Recipe | None = None) -> None:
    """Write `model` (its planned Linears `CompressedLinear`s, e.g. `compress.load(dir)`) as a Hugging Face
    checkpoint folder in compressed-tensors `pack-quantized`: config.json (model config, `dtype`, the
    `quantization_config`), safetensors (packed layers; everything else in `dtype`), tokenizer,
    generation config and a README.md model card.

    `layout`: "dense" for compressed-tensors >= 0.18 (vLLM's GPU builds, Humming), "padded" for <= 0.17
    (vLLM's CPU build pins 0.17.0); only 3/5/6/7-bit layers differ (module docstring). `exact=False`
    writes scales that `dtype` rounds (see `dtype_problems`) instead of refusing."""
    out = Path(out)
    if layout not in LAYOUTS:
        raise CompressError(f"layout={layout!r} is unknown; choose one of {list(LAYOUTS)}")
    if dtype not in DTYPES:
        raise CompressError(f"dtype {dtype} is not a compressed-tensors model dtype; use float16, bfloat16 or float32")
    modules = dict(model.named_modules())
    missing = [n for n in plan if not isinstance(modules.get(n), CompressedLinear)]
    if missing:
        raise CompressError(f"{_names(missing)} are not packed (CompressedLinear); export a compressed model, "
                            "e.g. compress.load(DIR)")
    differ = [n for n in plan if modules[n].spec != plan[n]]
    if differ:
        raise CompressError(f"{_names(differ)}: the plan differs from the layers' own specs; "
                            "pass the checkpoint's plan")
    linears = _linear_names(model)
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in linears}
    bad = problems(plan, shapes)
    if bad:
        raise CompressError(f"cannot export to {NAME}: " + " | ".join(bad))
    if exact and (bad := dtype_problems(plan, dtype)):
        raise CompressError(" | ".join(bad) + " (or pass exact=False to accept rounded scales)")
    if (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text()).get("quantization_config", {})
        if old.get("quant_method") not in (None, "compressed-tensors"):
            raise CompressError(f"{out} holds a {old.get('quant_method')} checkpoint; export into another folder")

    packed = {f"{n}.{k}" for n in plan for k in modules[n].packed()}
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in model.state_dict().items():
        if k in packed:
            continue
        key = (v.untyped_storage().data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:  # a tied weight (lm_head = embed_tokens): from_pretrained re-ties it
            continue
        seen.add(key)
        tensors[k] = (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
    for n in plan:
        for k, v in layer_tensors(modules[n], dtype, layout).items():
            tensors[f"{n}.{k}"] = v
        scale = modules[n].decoded().scale.detach().cpu()
        if exact and not torch.equal(tensors[f"{n}.weight_scale"].to(scale.dtype), scale):
            raise CompressError(f"{n}: {plan[n].scale_dtype} scales outside {str(dtype).removeprefix('torch.')}'s "
                                "normal range; fix: export with dtype float32 or bfloat16 (or pass exact=False)")

    out.mkdir(parents=True, exist_ok=True)
    for f in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)  # stale shards of an earlier export would mix with these
    _save_tensors(tensors, out, max_shard_size)
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(plan, shapes, linears, layout)
    config.dtype = dtype
    config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"]  # what loaders built on transformers 4.x read
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card(plan, shapes, dtype, layout), encoding="utf-8")


def _save_tensors(tensors: dict[str, Tensor], out: Path, max_shard_size: str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
