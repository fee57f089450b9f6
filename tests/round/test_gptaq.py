"""GPTAQ in the block driver: the dense stream beside the quantized one, and what each Linear's cross term sees."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from helpers import logits, run, tiny_llama

import compress
from compress import checkpoint, sequential
from compress.models import arch_of
from compress.plan import LayerSpec, LayerWeight, Plan
from compress.round import rtn

WINDOWS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))


class Spy:
    """A Hessian method that records what the driver hands it (H and D per Linear) and rounds to nearest."""

    needs_hessian: ClassVar[bool] = True
    asymmetric = 1.0
    seen: ClassVar[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    @staticmethod
    def apply(lw: LayerWeight, H: torch.Tensor, cfg: Any, D: torch.Tensor | None = None) -> LayerWeight:
        Spy.seen[Spy.current] = (H.clone(), None if D is None else D.clone())
        return rtn.apply(lw, H, rtn.Config())


def inputs(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The input of Linear `name` on WINDOWS, batch by batch of 2 as the driver runs them: [4·24, K]."""
    got = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, inp, _o: got.append(inp[0].detach()))
    with torch.no_grad():
        for i in range(0, len(WINDOWS), 2):
            model(WINDOWS[i : i + 2])
    handle.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).float()


def test_each_linear_pairs_its_quantized_input_with_the_dense_models_input_of_the_same_token(
        monkeypatch: Any) -> None:
    """H = 2/n Σ x xᵀ on the model quantized up to the block in hand, D = 2/n Σ (x̃ − x) xᵀ with x̃ the dense model's
    input of the same token, computed here from two independent forwards."""
    dense = tiny_llama(num_hidden_layers=3).float()
    model = copy.deepcopy(dense)
    arch = arch_of(model)
    plan = Plan({n: LayerSpec(bits=2, group_size=32) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n})
    real = sequential.round_linear

    def spying(name: str, *a: Any, **kw: Any) -> Any:
        Spy.current = name
        return real(name, *a, **kw)

    monkeypatch.setattr(sequential, "round_linear", spying)
    sequential.run(model, arch, plan, SimpleNamespace(apply=Spy.apply), Spy(), WINDOWS, batch_size=2)
    for i, name in [(0, "model.layers.0.self_attn.q_proj"), (1, "model.layers.1.self_attn.o_proj"),
                    (2, "model.layers.2.mlp.down_proj")]:
        mixed = copy.deepcopy(dense)  # blocks before i quantized as the driver left them, block i still dense
        for j in range(i):
            mixed.model.layers[j] = model.model.layers[j]
        x, x_dense = inputs(mixed, name), inputs(dense, name)
        n = len(WINDOWS)
        H, D = Spy.seen[name]
        assert torch.allclose(H, 2 / n * x.T @ x, rtol=1e-4, atol=1e-5)
        assert torch.allclose(D, 2 / n * (x_dense - x).T @ x, rtol=1e-4, atol=1e-5)
        assert (i == 0) == bool(D.abs().max() == 0)  # block 0 sees the dense model's own inputs


def test_gptaq_compresses_with_true_sequential_and_spill_and_reloads(tmp_path: Any) -> None:
    """round.asymmetric through a recipe: every Linear reports the cross term used; true-sequential groups and
    spilled hidden states give the same checkpoint; from_pretrained reproduces the in-memory model."""
    edits = ("round.asymmetric=0.25", "calibrate.true_sequential=true", "calibrate.batch_size=2")
    a, b = tiny_llama(num_hidden_layers=3), tiny_llama(num_hidden_layers=3)
    res = run(a, "gptq-3bit", edits)
    run(b, "gptq-3bit", (*edits, "calibrate.max_memory=0.00002"))
    assert all(r.info.get("asymmetric") == 1.0 for blk in res.blocks for r in blk.layers)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    plain = tiny_llama(num_hidden_layers=3)
    run(plain, "gptq-3bit", edits[1:])
    assert any(not torch.equal(sa[k], plain.state_dict()[k]) for k in sa)  # the cross term changed codes
    checkpoint.save(a, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(a))


def test_routed_experts_fall_back_to_plain_gptq_and_say_so() -> None:
    """An MoE block's experts may see other tokens in the dense stream than in the quantized one: no pairing, so their
    Linears are rounded by plain GPTQ (asymmetric 0 in their reports); attention still gets GPTAQ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=4,
                               num_experts_per_tok=2)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    res = run(m, "gptq-4bit", ("round.asymmetric=0.25",))
    reports = {r.name: r.info["asymmetric"] for blk in res.blocks for r in blk.layers}
    assert all(v == 1.0 for n, v in reports.items() if "self_attn" in n)
    assert all(v == 0.0 for n, v in reports.items() if ".experts." in n)
