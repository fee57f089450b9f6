"""Export to GGUF: one `model.gguf` that llama.cpp, llama-cpp-python, ollama and LM Studio load as it is.

What goes into the file (GGUF v3, written with the `gguf` package's GGUFWriter):

    metadata   general.architecture (llama.cpp's: llama, qwen2, qwen3), the hyper-parameters it reads
               ({arch}.block_count, .embedding_length, .feed_forward_length, .attention.head_count(_kv),
               .rope.freq_base, .attention.layer_norm_rms_epsilon, .rope.dimension_count, .context_length,
               .vocab_size), general.file_type (the llama.cpp ftype), general.quantization_version
    tokenizer  tokenizer.ggml.model "gpt2" (byte-level BPE), .pre, .tokens, .token_type (special added
               tokens are CONTROL, other added ones USER_DEFINED), .merges, the special token ids,
               add_bos/add_eos, tokenizer.chat_template
    tensors    llama.cpp's names (blk.{i}.attn_q.weight, ..., token_embd.weight, output_norm.weight,
               output.weight), dims [K, N] as ggml counts them:
               - a ggml layer (gguf-* recipes, compress/codecs/ggml.py): its blocks, byte for byte;
               - an affine layer whose grid is a ggml type exactly (symmetric, groups of 32, float16 scales:
                 4 bits = q4_0, 5 = q5_0, 8 = q8_0): its codes and scales repacked, nothing re-rounded;
               - the token embedding and output matrix: rounded here by the type's own search (compress/ggml.py)
                 to the type llama.cpp's mix gives them (compress/mix.py: q6_k, or q8_0 when the rows do not fit
                 256-blocks, for both when they are tied); `dense_type` keeps them in f16/bf16/f32 instead;
               - norms and biases: f32.
llama.cpp's llama architecture applies rotary embeddings to interleaved pairs, transformers' Llama to the two
halves of each head, so the rows of q_proj and k_proj are permuted per head (rows of a ggml tensor are whole
blocks: the permutation moves bytes, it rounds nothing), as llama.cpp's converter does.

A plan this format cannot hold (a layer of another kind, rows that do not fit the type's blocks, a model type
llama.cpp does not know here, a tokenizer that is not byte-level BPE) is refused before any calibration.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from compress import ggml, mix
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, Plan

if TYPE_CHECKING:
    from compress.recipe import Recipe

log = logging.getLogger(__name__)

NAME = "gguf"
FILE = "model.gguf"
EXACT = {4: "q4_0", 5: "q5_0", 8: "q8_0"}  # symmetric affine g32 float16 grids that are ggml types as they are
ROPE_SCALING = (None, "default", "linear")  # rope_scaling types whose GGUF form we write
DENSE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def layer_type(spec: LayerSpec, K: int) -> str | None:
    """The ggml type a planned Linear is written as, or None when its grid is not one."""
    if spec.kind == "ggml":
        return spec.ggml
    if (spec.kind == "affine" and spec.symmetric and spec.group_size == 32 and isinstance(spec.bits, int)
            and spec.bits in EXACT and spec.scale_dtype == "float16" and K % 32 == 0):
        return EXACT[spec.bits]
    return None


def problems(plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None = None,
             dtype: torch.dtype | None = None, config: Any = None) -> list[str]:
    """What a GGUF cannot hold, one line each with the fix (before calibration when given the recipe and the
    model's config)."""
    out = []
    if config is not None:
        try:
            check_config(config)
        except CompressError as e:
            out.append(str(e))
    if recipe is not None and recipe.allocate.method == "ggml_baq":
        return out  # it chooses among ggml types, each fitted to the rows
    if recipe is not None and recipe.allocate.method in ("baq", "evopress"):
        choices = getattr(recipe.allocate.config, "choices", ())
        if not all(isinstance(c, str) and c in ggml.TYPES for c in choices):
            out.append(f"allocate: {recipe.allocate.method} chooses widths {list(choices)}, not ggml types; "
                       "give it ggml types (choices: [q2_k, q3_k, q4_k, q5_k, q6_k])")
            return out
        return out  # each choice is checked against the shapes by the allocator itself
    bad: dict[str, list[str]] = {}
    for name, spec in plan.layers.items():
        K = shapes[name][1]
        t = layer_type(spec, K)
        if t is None:
            bad.setdefault(f"a {spec.kind} layer (bits={spec.bits}, group_size={spec.group_size}, "
                           f"{'sym' if spec.symmetric else 'asym'}) is not a ggml type", []).append(name)
        elif not ggml.fits(t, K):
            bad.setdefault(f"{t} needs rows of a multiple of {ggml.TYPES[t].block} (in_features={K}; llama.cpp "
                           f"uses {mix.fitted(t, K)} there)", []).append(name)
    for why, names in bad.items():
        out.append(f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {why}; compress with a "
                   "gguf-* recipe (e.g. --recipe gguf-q4_k_m), which rounds onto ggml's own grids")
    return out


def check_config(config: Any) -> str:
    """The llama.cpp architecture of a transformers config, or a one-line refusal of what we cannot write."""
    arch = mix.gguf_arch(config.model_type)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING:
        raise CompressError(f"GGUF: rope scaling {kind!r} is not written here yet (we write {ROPE_SCALING[1:]}); "
                            "keep the compress checkpoint or use another --format")
    return arch


def write(model: nn.Module, tokenizer: Any, plan: Plan, out: Path, *, dtype: torch.dtype,
          recipe: Recipe | None = None, dense_type: str | None = None) -> Path:
    """Write `out`/model.gguf. `dtype`: the type of tensors kept unquantized (f16/bf16/f32). The token embedding
    and output matrix get llama.cpp's types for the recipe's ftype (`dense_type`: keep them in that dense type)."""
    import gguf

    cfg = model.config
    arch = check_config(cfg)
    n_layer = cfg.num_hidden_layers
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    lines = problems(plan, shapes)
    if lines:
        raise CompressError(f"gguf cannot hold this model: {lines[0]}")
    ftype = _ftype(plan, shapes, recipe)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, cfg, arch, ftype, dense_type, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer(w, tokenizer, Path(tmp), cfg.vocab_size)
    tied = _tied(model)
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    types: Counter[str] = Counter()
    packed = set()  # state_dict names of the compressed Linears' own buffers (written as their blocks)
    for owner, m in model.named_modules():
        if isinstance(m, CompressedLinear):
            packed |= {f"{owner}.{b}" for b in m.packed()}
            gname = _name(f"{owner}.weight", arch, n_layer)
            kind, data = _packed(m, plan[owner])
            data = _permuted(gname, data, arch, heads, kv_heads)
            w.add_tensor(gname, data.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind.upper()])
            types[kind] += 1
    for name, t in model.state_dict(keep_vars=True).items():
        if name in packed:
            continue
        if name == "lm_head.weight" and tied:
            continue
        gname = mix.gguf_name(name, arch, n_layer)
        if gname is None:
            if re.search(r"(rotary_emb|inv_freq)", name) or not t.is_floating_point():
                continue  # derived buffers llama.cpp recomputes
            raise CompressError(f"GGUF ({arch}): no llama.cpp tensor for {name}; this model is not written here yet")
        x = t.detach().float()
        if x.dim() == 2:
            cat = mix.category(gname)
            kind = (dense_type or (mix.output_type(ftype, x.shape[1]) if cat == "output" or (cat == "token_embd"
                    and tied) else mix.embedding_type(ftype, x.shape[1]) if cat == "token_embd" else DENSE[dtype]))
            x = _permuted(gname, x, arch, heads, kv_heads)
        else:
            kind = "f32"  # norms and biases
        _add(w, gname, x, kind)
        types[kind] += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s: %s", path, dict(types))
    return path


def write_dense(model: nn.Module, tokenizer: Any, out: Path, *, dtype: torch.dtype) -> Path:
    """The uncompressed model as a GGUF of `dtype` (what llama.cpp's own tools start from)."""
    return write(model, tokenizer, Plan({}), out, dtype=dtype, dense_type=DENSE[dtype])


def _ftype(plan: Plan, shapes: Mapping[str, tuple[int, int]], recipe: Recipe | None) -> str:
    """The recipe's llama.cpp mix, or the one whose base type most of the plan's weights have."""
    if recipe is not None and recipe.allocate.method in ("mix", "ggml_baq"):
        return recipe.allocate.config.ftype
    weights: Counter[str] = Counter()
    for n, spec in plan.layers.items():
        weights[layer_type(spec, shapes[n][1]) or ""] += shapes[n][0] * shapes[n][1]
    base = weights.most_common(1)[0][0] if weights else "q8_0"
    return next((f for f, (b, _) in mix.FTYPES.items() if b == base), "q8_0")


def _metadata(w: Any, cfg: Any, arch: str, ftype: str, dense_type: str | None, dtype: torch.dtype) -> None:
    import gguf

    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(getattr(cfg, "_name_or_path", "") or arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    dense = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    w.add_file_type(int(dense[dense_type]) if dense_type else mix.FTYPES[ftype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0) if isinstance(params, dict) else 10000.0
    return theta


def _tokenizer(w: Any, tokenizer: Any, tmp: Path, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, from the tokenizer's own tokenizer.json."""
    import gguf

    if tokenizer is None:
        raise CompressError("GGUF needs the tokenizer; this checkpoint has none (save it with the tokenizer)")
    tokenizer.save_pretrained(tmp)
    try:
        tj = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    except OSError:
        raise CompressError("GGUF: this tokenizer has no tokenizer.json (a fast tokenizer); it is not written here "
                            "yet") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise CompressError(f"GGUF: we write byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM families); this "
                            f"one is {model.get('type')} with a {(tj.get('decoder') or {}).get('type')} decoder")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {}
    for a in tj.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        special[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    kinds = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i], kinds[i] = text, special.get(i, gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre(tj.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types([int(k) for k in kinds])
    special_vocab = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n)
    special_vocab.add_to_gguf(w, quiet=True)


def _pre(pre: Any) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer: the GPT-2 split (a plain ByteLevel with
    its regex) is "gpt-2"; a digit split before it (SmolLM) is "smollm"; others are refused, naming what we saw."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise CompressError(f"GGUF: the tokenizer's pre-tokenizer {kinds} has no llama.cpp name here yet; keep the "
                        "compress checkpoint or use another --format")


def _tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is None or (isinstance(head, nn.Linear) and head.weight is emb.weight) or bool(
        getattr(model.config, "tie_word_embeddings", False))


def _name(name: str, arch: str, n_layer: int) -> str:
    g = mix.gguf_name(name, arch, n_layer)
    if g is None:
        raise CompressError(f"GGUF ({arch}): no llama.cpp tensor for {name}; this model is not written here yet")
    return g


def _packed(m: CompressedLinear, spec: LayerSpec) -> tuple[str, Tensor]:
    """(ggml type, blocks uint8 [N, bytes]) of a compressed Linear, repacked exactly when it is affine."""
    if spec.kind == "ggml":
        return spec.ggml, m.blocks.detach().cpu()
    t = layer_type(spec, m.in_features)
    if t is None:
        raise CompressError(f"a {spec.kind} layer is not a ggml type; compress with a gguf-* recipe")
    d = m.decoded()
    params = d.scale.float().reshape(m.out_features, -1, 1)  # [N, B, 1]: d per block of 32
    return t, ggml.pack(t, d.codes, params)


def _permuted(gname: str, x: Tensor, arch: str, heads: int, kv_heads: int) -> Tensor:
    """llama.cpp's llama rotary layout: the rows of attn_q/attn_k interleaved per head (x: [N, ...])."""
    if arch != "llama" or not re.search(r"\.attn_[qk]\.weight$", gname):
        return x
    n = heads if ".attn_q." in gname else kv_heads
    N = x.shape[0]
    return x.reshape(n, 2, N // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _add(w: Any, gname: str, x: Tensor, kind: str) -> None:
    """One tensor: quantized by our own search for a ggml type, else as the dense dtype."""
    import gguf

    if kind in ggml.TYPES:
        blocks = ggml.quantize(kind, x)
        w.add_tensor(gname, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType[kind.upper()])
    elif kind == "bf16":
        raw = x.to(torch.bfloat16).view(torch.uint16).numpy()  # numpy has no bfloat16: the bits, typed BF16
        w.add_tensor(gname, raw, raw_shape=list(x.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        w.add_tensor(gname, x.numpy().astype({"f32": "float32", "f16": "float16"}[kind]))
