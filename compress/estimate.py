"""What a run will take, before it runs (issue 19): `compress plan` prints it and `compress MODEL` refuses a run
whose memory estimate exceeds what the machine has.

    estimate(model, arch, plan, recipe, streamed=...) -> Estimate    from shapes alone (the model may be on meta)
    seconds(model, arch, plan, recipe, source) -> float             a measured short run of block 0, scaled

The memory model follows the block-by-block driver (compress/sequential.py): what stays resident (the whole model,
or only what lies outside the blocks when it is read block by block), one block converted to float32, the Hessians
that live at once (every planned Linear of a block, or the largest true-sequential group), GPTQ's workspace for the
largest Linear, the calibration hidden states (inputs and outputs of a block, in the model's dtype) and one batch's
float32 activations inside a block; GPTAQ (round.asymmetric) doubles the Hessians, and GPTAQ or the reconstruction
doubles the hidden states and adds a dense float32 copy of the block (its own stream); the reconstruction adds one
block's training state. A rotation that unties a tied head (R1) adds that head's copy, resident and on disk.
It is an estimate: evals/any_size.py compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress import codecs, models
from compress.plan import Plan
from compress.recipe import Recipe
from compress.util import rss_mb

FLOAT32 = 4
HEADER_BYTES = 100  # about one tensor's entry in a safetensors header


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Estimate:
    """Bytes (and seconds) a run is expected to take; `parts` says where the peak comes from."""

    streamed: bool
    parts: dict[str, int] = field(default_factory=dict)  # peak RAM, by what holds it
    gpu: int | None = None  # peak GPU memory with --device cuda (one block, its Hessians, the hidden states)
    output: int = 0  # bytes of the checkpoint's weight files
    work: int = 0  # bytes the work directory reaches (every finished block until the checkpoint is written)
    seconds: float | None = None  # from `seconds`, when measured

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


def packed_bytes(spec: Any, N: int, K: int) -> int:
    """Bytes of one packed Linear's tensors, as its codec stores them."""
    return sum(int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
               for shape, dt in codecs.of(spec).buffers(spec, N, K).values())


def estimate(model: nn.Module, arch: models.Arch, plan: Plan, recipe: Recipe, *, streamed: bool,
             save_dtype: torch.dtype | None = None, baseline_mb: float | None = None) -> Estimate:
    """The run's peak RAM (and GPU memory, disk) from the model's shapes; see the module docstring."""
    blocks = models.blocks_of(model, arch)
    block_params = max(_bytes([*b.parameters(), *b.buffers()]) for b in blocks)
    block_numel = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    everything = [*model.parameters(), *model.buffers()]
    outside = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if not n.startswith(arch.blocks + ".")]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in plan}
    c = recipe.calibrate
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    dtype = next(model.parameters()).dtype
    item = torch.empty((), dtype=dtype).element_size()
    hidden = int(getattr(model.config, "hidden_size", 0) or max(K for _, K in shapes.values()))
    widest = max((max(N, K) for n, (N, K) in shapes.items() if n != plan.head), default=hidden)  # in a block
    heads = int(getattr(model.config, "num_attention_heads", 1) or 1)

    # the Hessians alive at once: one block's planned Linears (all, or per true-sequential group)
    per_block: dict[str, list[int]] = {}
    for n, (_, K) in shapes.items():
        per_block.setdefault(n.removeprefix(arch.blocks + ".").split(".")[0], []).append(K * K * FLOAT32)
    groups = [sum(v) for v in per_block.values()]
    if c.true_sequential:
        groups = [max(v) * 3 for v in per_block.values()]  # q/k/v share a group: about three of the largest
    hessians = max(groups, default=0) if recipe.round.config.needs_hessian else 0
    asymmetric = getattr(recipe.round.config, "asymmetric", 0.0) > 0
    hessians *= 2 if asymmetric else 1  # GPTAQ: a cross term D beside each H
    # GPTAQ and the reconstruction run a dense copy of the block beside the rounded one, on its own hidden states
    twin = asymmetric or recipe.reconstruct.epochs > 0
    # GPTQ's float32 [N, K] and [K, K] work (compress/round/gptq.py): W, its grids' scales and zeros and W's permuted
    # copy beside the damped Hessian and its Cholesky factor; then the sweep's W, Q, error, scales and zeros beside
    # the factor of the inverse. The largest over the Linears (a wide input, as a down_proj's, costs the most).
    rounding = max(max(4 * N * K + 2 * K * K, 5 * N * K + K * K) * FLOAT32 for N, K in shapes.values())
    needs_data = recipe.round.config.needs_hessian
    states = (4 if twin else 2) * c.samples * c.seqlen * hidden * item if needs_data else 0  # a block's ins and outs
    batch = min(c.batch_size, c.samples)
    forward = batch * c.seqlen * (6 * hidden + 3 * widest) * FLOAT32 + batch * heads * c.seqlen**2 * FLOAT32
    # R1 unties a tied head (compress/rotate.py): a second copy of the embedding, resident and on disk
    head = model.get_output_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    untied = {head_key} & tied if recipe.rotate.method != "none" and recipe.rotate.r1 else set()
    head_bytes = head.weight.numel() * item if untied else 0
    # the reconstruction trains one block at a time: fp32 latent weights, their gradients and AdamW's two moments,
    # and one step's activations kept for the backward pass (and their gradients)
    rc = recipe.reconstruct
    training = 4 * block_numel * FLOAT32 + 2 * forward * rc.batch_size // batch if rc.epochs else 0
    parts = {
        "python, torch and transformers": int((baseline_mb if baseline_mb is not None else rss_mb()) * 2**20),
        "resident model": (_bytes(outside) if streamed else _bytes(everything)) + head_bytes,
        # (a streamed block is read in the model's dtype and converted; a whole float32 model's blocks already are)
        "one block in float32": (block_numel * FLOAT32 if streamed or dtype != torch.float32 else 0)
        + (block_params if streamed else 0) + (block_numel * FLOAT32 if twin else 0),
        "Hessians": hessians,
        "rounding workspace": rounding,
        "calibration hidden states": states,
        "one batch through a block": forward if needs_data else 0,
        "reconstruction": training,
    }
    save = torch.empty((), dtype=save_dtype or dtype).element_size()
    weights = {f"{n}.weight" for n in plan}
    dense = sum(t.numel() * (save if t.is_floating_point() else t.element_size())
                for k, t in model.state_dict().items() if (k not in tied or k in untied) and k not in weights)
    n_tensors = len(model.state_dict()) + sum(len(codecs.of(plan[n]).buffers(plan[n], *shapes[n])) for n in plan)
    header = n_tensors * HEADER_BYTES  # each tensor's name, dtype, shape and offsets in the safetensors header
    output = dense + sum(packed_bytes(plan[n], *shapes[n]) for n in plan) + header
    gpu = block_numel * FLOAT32 + hessians + rounding + states + (forward if needs_data else 0) + training
    return Estimate(streamed, parts, gpu, output, output)


def seconds(model: nn.Module, arch: models.Arch, plan: Plan, recipe: Recipe, source: Any = None,
            windows: int = 1) -> float:
    """The rounding stage's expected wall seconds, from a measured probe of block 0 (compress/sequential.py
    `probe`: its forward on `windows` random windows, and its Linears rounded): per block, the rounding plus one
    forward per calibration window for each Hessian pass and for the hand-off to the next block (twice with
    GPTAQ's dense twin), and the reconstruction's training steps and error passes."""
    from compress import sequential
    from compress.round import METHODS

    c, rnd = recipe.calibrate, recipe.round
    forward, rounding = sequential.probe(model, arch, plan, METHODS[rnd.method], rnd.config, windows, c.seqlen,
                                         source)
    groups = len(arch.sequential) if c.true_sequential else 1
    passes = groups + 1 if rnd.config.needs_hessian else 0
    rc, asymmetric = recipe.reconstruct, getattr(rnd.config, "asymmetric", 0.0) > 0
    passes += (groups if asymmetric else 0) + (1 if asymmetric or rc.epochs else 0)  # GPTAQ's / Block-AP's twin
    # reconstruction: a training step costs about three forwards, plus an error pass per epoch and one each side
    recon = forward * min(rc.samples or c.samples, c.samples) * (4 * rc.epochs + 2) if rc.epochs else 0.0
    return len(models.blocks_of(model, arch)) * (rounding + forward * c.samples * passes + recon)
