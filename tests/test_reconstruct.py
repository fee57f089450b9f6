"""Block-wise reconstruction (compress/reconstruct.py): it starts from the rounding's own result, never leaves a
block worse on its training windows, stores what it trained exactly, and refuses what it cannot train up front."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import logits, run, tiny_llama

from compress import checkpoint, recipe
from compress.errors import CompressError
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight
from compress.reconstruct import APLinear, errors, train_block
from compress.round import rtn

EDITS = ("calibrate.batch_size=2", "calibrate.samples=16")


def test_training_starts_at_the_rounded_weights_and_packs_back_exactly() -> None:
    """APLinear decodes the packed layer's weights bit for bit, and packing it untrained changes no buffer."""
    m = tiny_llama(num_hidden_layers=1)
    run(m, "gptq-3bit", EDITS)
    lin = next(x for x in m.modules() if isinstance(x, CompressedLinear))
    before = {k: t.clone() for k, t in lin.packed().items()}
    ap = APLinear(lin)
    assert torch.equal(ap.decoded(), lin.dequantize())
    ap.pack()
    assert all(torch.equal(before[k], t) for k, t in lin.packed().items())


class _Block(torch.nn.Module):
    """A one-Linear 'block' (train_block calls block(x, *args, **kwargs))."""

    def __init__(self, lin: torch.nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_the_rates_are_in_grid_steps_so_a_rescaled_layer_trains_the_same() -> None:
    """Weights x4 and inputs /4 give the same outputs; with the latent weights and scales measured in grid steps the
    training sees the same gradients step for step, so it ends at the same codes with 4x the scales: one learning
    rate suits layers of any magnitude (in raw units a fixed rate is 4x more grid steps in the smaller layer)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    xs = [torch.randn(2, 8, 64, generator=g) for _ in range(3)]
    ys = [x @ W.T + 0.05 * torch.randn(2, 8, 24, generator=g) for x in xs]  # (targets the grid cannot hit)
    trained = []
    for c in (1.0, 4.0):
        spec = LayerSpec(bits=3, group_size=32)
        lin = CompressedLinear.from_weight(rtn.apply(LayerWeight(W * c, spec), None, rtn.Config()))
        block = _Block(lin)
        before, after = train_block(block, [x / c for x in xs], ys, [((), {})] * 3,
                                    recipe.Reconstruct(epochs=3, lr=0.05, scale_lr=0.01), torch.device("cpu"))
        assert after < before
        trained.append((lin.codes().clone(), lin.scale.float().clone()))
    (q1, s1), (q4, s4) = trained
    assert torch.equal(q1, q4)
    assert torch.equal(s1 * 4, s4)


def test_each_block_ends_no_worse_and_the_model_closer_to_the_dense_one(tmp_path) -> None:
    """Every block's output error against the dense block is at most what the rounding left (lower on most);
    the reconstructed model is nearer the dense model's logits on windows it did not train on; the checkpoint
    reloads to the same logits."""
    dense = tiny_llama(num_hidden_layers=3)
    plain, recon = copy.deepcopy(dense), copy.deepcopy(dense)
    edits = ("calibrate.batch_size=2", "calibrate.samples=64")  # (16 windows of 32 random tokens overfit)
    run(plain, "gptq-2bit", edits)
    res = run(recon, "gptq-2bit", (*edits, "reconstruct.epochs=4"))
    errs = [(b.info["recon_before"], b.info["recon_after"]) for b in res.blocks]
    assert all(after <= before for before, after in errs)
    assert sum(after < before for before, after in errs) >= 2
    ref = logits(dense)
    assert ((logits(recon) - ref) ** 2).mean() < ((logits(plain) - ref) ** 2).mean()
    checkpoint.save(recon, None, res.plan, res.recipe, tmp_path, card="card")
    from compress import load

    assert torch.equal(logits(load(tmp_path)), logits(recon))


def test_the_token_loss_weighs_every_token_alike() -> None:
    """loss=token is each token's relative error: scaling a token's output and target together leaves it unchanged
    (an attention sink with 100x the norm counts as much as any token), where the plain MSE grows 10^4-fold."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 8, 16, generator=g)
    out = y + 0.1 * torch.randn(y.shape, generator=g)
    c = torch.ones(2, 8, 1)
    c[:, 0] = 100.0
    assert torch.allclose(errors(out * c, y * c, "token"), errors(out, y, "token"))
    assert errors(out * c, y * c, "mse").mean() > 100 * errors(out, y, "mse").mean()


def test_the_token_loss_fits_the_ordinary_tokens_beside_a_massive_one() -> None:
    """Inputs whose first token is 100x the others (as the attention sink's hidden state): trained on the MSE the
    block fits that one token; trained on the token loss it fits the others better."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    xs = [torch.randn(2, 8, 64, generator=g) for _ in range(4)]
    for x in xs:
        x[:, 0] *= 100.0
    ys = [x @ W.T for x in xs]
    rest = []
    for loss in ("mse", "token"):
        lin = CompressedLinear.from_weight(rtn.apply(LayerWeight(W, LayerSpec(bits=2, group_size=32)), None,
                                                     rtn.Config()))
        train_block(_Block(lin), xs, ys, [((), {})] * 4, recipe.Reconstruct(epochs=8, lr=0.05, loss=loss),
                    torch.device("cpu"))
        with torch.no_grad():
            rest.append(sum(float(errors(lin(x)[:, 1:], y[:, 1:], "token").mean())
                            for x, y in zip(xs, ys, strict=True)))
    assert rest[1] < rest[0]


def test_a_training_that_does_not_help_leaves_the_block_as_rounded() -> None:
    """A learning rate far too high: the trained block is worse, so the rounded one is kept, buffers unchanged."""
    m = tiny_llama(num_hidden_layers=1)
    run(m, "gptq-3bit", EDITS)
    block = m.model.layers[0]
    state = {k: v.clone() for k, v in block.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 8, 64, generator=g) for _ in range(3)]
    pos = torch.arange(8)[None]
    calls = [((), {"position_embeddings": m.model.rotary_emb(x, pos)}) for x in xs]
    ys = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs]
    before, after = train_block(block, xs, ys, calls, recipe.Reconstruct(epochs=3, lr=10.0, scale_lr=10.0),
                                torch.device("cpu"))
    assert after == before
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())


@pytest.mark.parametrize(("name", "edits", "what"), [
    ("pbllm-1bit", (), "binary"),
    ("rtn-4bit", (), "round.method=rtn"),
    ("gptq-4bit", ("weights.ggml=q4_0",), "ggml"),
])
def test_what_it_cannot_train_is_refused_before_calibration(name: str, edits: tuple[str, ...], what: str) -> None:
    m = tiny_llama(num_hidden_layers=1)
    with pytest.raises(CompressError, match=what):
        run(m, name, (*edits, "reconstruct.epochs=1", "calibrate.dataset=nonexistent"))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_step_on_some_windows_of_a_batch_sees_what_the_whole_batch_run_sees(family: str) -> None:
    """The block's arguments cut to some windows (masks, positions, rotary tables; Gemma 3's sliding-window
    blocks) give those windows' outputs of the whole batch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress import models, sequential
    from compress.reconstruct import _output, _rows

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=96, num_hidden_layers=1, head_dim=16,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, sliding_window=4)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    cap = sequential.capture_inputs(m, models.arch_of(m), ids, 4, torch.device("cpu"))
    block, x, call = models.blocks_of(m, models.arch_of(m))[0].float(), cap.hidden[0].float(), cap.calls[0][0]
    with torch.no_grad():
        whole = _output(block, x, call, torch.device("cpu"))
        part = _output(block, x[1:3], _rows(call, 4, slice(1, 3)), torch.device("cpu"))
    assert torch.allclose(part, whole[1:3], atol=1e-5)


def test_spilled_hidden_states_train_to_the_same_block() -> None:
    """Hidden states spilled to disk beyond calibrate.max_memory are read back window by window: the same result."""
    a, b = tiny_llama(num_hidden_layers=2), tiny_llama(num_hidden_layers=2)
    edits = ("calibrate.batch_size=2", "reconstruct.epochs=2", "reconstruct.samples=4")
    run(a, "gptq-3bit", edits)
    run(b, "gptq-3bit", (*edits, "calibrate.max_memory=0.00002"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
