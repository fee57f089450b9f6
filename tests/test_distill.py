"""Distillation: KL falls, what must not train does not, the packed format survives, a resumed run ends
where an uninterrupted one does, and two gloo processes follow the one-process loss curve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL, WINDOWS, logits, run, tiny_llama, torchrun

import compress
from compress import checkpoint, data, distill, recipe, teacher
from compress import format as fmt
from compress.nn import CompressedLinear
from compress.workdir import WorkDir


def setup(name: str = "rtn-4bit", edits: tuple[str, ...] = ("weights.bits=2",)
          ) -> tuple[torch.nn.Module, teacher.Teacher]:
    teach = teacher.teacher(tiny_llama(), WINDOWS, 0, 4, torch.device("cpu"))  # full vocabulary
    m = tiny_llama()
    run(m, name, edits)
    return m, teach


def kl_to_dense(m: torch.nn.Module) -> float:
    """Full-vocabulary KL(dense ‖ m) on the training windows (random tokens: nothing to generalise to)."""
    with torch.no_grad():
        p = tiny_llama()(WINDOWS).logits.log_softmax(-1)
        q = m(WINDOWS).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("train", ["scales", "norms"])
def test_distillation_lowers_kl_and_keeps_the_packed_format(train: str, tmp_path: Path) -> None:
    m, teach = setup()
    before_codes = {n: mod.qweight.clone() for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
    before = kl_to_dense(m)
    cfg = distill.Config(steps=30, windows_per_step=8, batch_size=8, lr=1e-2, warmup=3, train=train)
    history = distill.distill(m, teach, WINDOWS, cfg)
    assert history[-1] < 0.8 * history[0] and kl_to_dense(m) < 0.8 * before
    for n, mod in m.named_modules():
        if isinstance(mod, CompressedLinear):
            assert mod.scale.dtype == torch.float16 and "scale" in dict(mod.named_buffers())
            assert torch.equal(mod.qweight, before_codes[n])  # only scales (and norms) move
    assert not any(p.requires_grad for p in m.parameters())
    res = run(tiny_llama(), "rtn-4bit", ("weights.bits=2",))  # the plan, to save with
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


def test_ste_re_rounds_onto_the_grid_exactly_what_training_saw() -> None:
    m, teach = setup()
    before = {n: mod.qweight.clone() for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
    seen = {}

    def last(p: distill.Progress) -> None:
        if p.step == p.steps:
            with torch.no_grad():
                seen["logits"] = m(WINDOWS).logits

    distill.distill(m, teach, WINDOWS, distill.Config(steps=20, windows_per_step=8, batch_size=8, lr=3e-3,
                                                      warmup=2, train="ste"), on_step=last)
    moved = sum(int((mod.qweight != before[n]).sum()) for n, mod in m.named_modules()
                if isinstance(mod, CompressedLinear))
    assert moved > 0  # codes changed ...
    with torch.no_grad():
        torch.testing.assert_close(m(WINDOWS).logits, seen["logits"], rtol=1e-5, atol=1e-6)  # ... as trained


def mean_edge(m: torch.nn.Module) -> float:
    """Mean Hamming distance / K between each binary layer's sign rows and their MST parents."""
    from compress import mst

    d = [float(mst.build(mod.codes().bool()).edge_distances().float().mean()) / mod.in_features
         for mod in m.modules() if isinstance(mod, CompressedLinear) and mod.spec.binary]
    return sum(d) / len(d)


def test_binary_ste_trains_signs_and_the_mst_regularizer_shortens_the_tree(tmp_path: Path) -> None:
    """PB-LLM layers under train=ste: the signs move, the salient weights stay on their 8-bit grid, the
    result is exactly what training saw and saves/loads exactly; mst_reg pulls sign rows toward their
    tree parents (shorter mean edge than the same training without it)."""
    edits = ("weights.salient=0.1",)
    out = {}
    for reg in (0.0, 2.0):
        m, teach = setup("pbllm-10", edits)
        if reg == 0.0:
            before = {n: mod.codes().clone() for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
            edge0 = mean_edge(m)
        seen = {}

        def last(p: distill.Progress, m: torch.nn.Module = m, seen: dict = seen) -> None:
            if p.step == p.steps:
                with torch.no_grad():
                    seen["logits"] = m(WINDOWS).logits

        cfg = distill.Config(steps=12, windows_per_step=8, batch_size=8, lr=3e-3, warmup=2, train="ste", mst_reg=reg)
        history = distill.distill(m, teach, WINDOWS, cfg, on_step=last)
        assert all(torch.isfinite(torch.tensor(history)))
        with torch.no_grad():
            torch.testing.assert_close(m(WINDOWS).logits, seen["logits"], rtol=1e-5, atol=1e-5)
        out[reg] = (m, mean_edge(m))
    m0 = out[0.0][0]
    moved = sum(int((mod.codes() != before[n]).sum()) for n, mod in m0.named_modules()
                if isinstance(mod, CompressedLinear))
    assert moved > 0
    assert out[2.0][1] < min(out[0.0][1], edge0)
    m2 = out[2.0][0]
    res = run(tiny_llama(), "pbllm-10", edits)
    from compress.plan import Plan

    plan = Plan({n: m2.get_submodule(n).spec for n in res.plan})  # the specs after training (MST edges)
    checkpoint.save(m2, None, plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m2))


def test_resumed_distillation_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    cfg = distill.Config(steps=8, windows_per_step=2, lr=1e-2, warmup=2, save_every=2)
    m, teach = setup()
    straight = distill.distill(m, teach, WINDOWS, cfg, workdir=tmp_path / "a")

    def stop(p: distill.Progress) -> None:
        if p.step == 5:  # the last saved state is step 4
            raise KeyboardInterrupt

    m2, _ = setup()
    with pytest.raises(KeyboardInterrupt):
        distill.distill(m2, teach, WINDOWS, cfg, workdir=tmp_path / "b", on_step=stop)
    m3, _ = setup()
    resumed = distill.distill(m3, teach, WINDOWS, cfg, workdir=tmp_path / "b")
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert torch.equal(logits(m3), logits(m))


def test_pipeline_runs_the_distillation_stage_from_the_recipe() -> None:
    m = tiny_llama()
    rec = recipe.load("rtn-4bit", [*SMALL, "weights.bits=2", "distill={steps: 12, windows_per_step: 8, batch_size: 8, "
                                                              "lr: 0.01, warmup: 1, topk: 0}"])
    res = compress.compress(m, None, rec)  # 8 calibration windows, all of them every step
    assert res.distilled["steps"] == 12 and res.distilled["kl_last"] < res.distilled["kl_first"]


def test_two_gloo_processes_follow_the_one_process_loss_curve(tmp_path: Path) -> None:
    one = torchrun("distill_worker.py", 1, tmp_path / "one.json")
    two = torchrun("distill_worker.py", 2, tmp_path / "two.json")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4)


def setup_kl(s: torch.Tensor, dense: torch.nn.Module) -> torch.Tensor:
    return teacher.teacher(dense, WINDOWS, 0, 4, torch.device("cpu")).kl(s, torch.arange(len(WINDOWS))).mean()


def test_temperature_kl_is_the_kl_of_the_softened_distributions(tmp_path: Path) -> None:
    """At T = 2 the teacher keeps log softmax(z/2) and the KL is that of softmax(z/2) vs softmax(s/2), with
    top-K + rest as at T = 1; the temperature survives save/load and a cached teacher of another T is redone."""
    dense, student = tiny_llama(), tiny_llama(seed=1)
    full = teacher.teacher(dense, WINDOWS, 0, 4, torch.device("cpu"), temperature=2.0)
    with torch.no_grad():
        p = (dense(WINDOWS).logits[:, :-1] / 2).log_softmax(-1).half().float()  # stored in fp16
        s = student(WINDOWS).logits
        q = (s[:, :-1] / 2).log_softmax(-1)
    idx = torch.arange(len(WINDOWS))
    torch.testing.assert_close(full.kl(s, idx), (p.exp() * (p - q)).sum(-1), rtol=1e-4, atol=1e-6)
    assert float(full.kl(s, idx).mean()) < 0.5 * float(setup_kl(s, dense))  # softer: a smaller KL than at T = 1
    top = teacher.cached(tmp_path / "t.safetensors", dense, WINDOWS, 16, 4, torch.device("cpu"), 2.0)
    assert teacher.Teacher.load(tmp_path / "t.safetensors").temperature == 2.0
    assert bool((top.kl(s, idx) <= full.kl(s, idx) + 1e-4).all())  # top-K + rest: a lower bound
    redone = teacher.cached(tmp_path / "t.safetensors", dense, WINDOWS, 16, 4, torch.device("cpu"), 1.0)
    assert redone.temperature == 1.0 and not torch.equal(redone.logp, top.logp)
    m, _ = setup()
    with pytest.raises(compress.CompressError, match="temperature"):
        distill.distill(m, top, WINDOWS, distill.Config(steps=1, temperature=1.0))


def hidden_error(m: torch.nn.Module) -> float:
    with torch.no_grad():
        out = m(input_ids=WINDOWS, output_hidden_states=True)
        return float(distill.hidden_nmse(out.hidden_states, tiny_llama(), WINDOWS).mean())


def test_hidden_state_term_pulls_the_blocks_toward_the_dense_ones() -> None:
    """The normalised hidden-state MSE is 0 for the dense model itself, and training on it (with the KL)
    ends nearer the dense hidden states than the same steps on the KL alone."""
    assert hidden_error(tiny_llama()) == 0.0
    cfg = dict(steps=20, windows_per_step=8, batch_size=8, lr=1e-2, warmup=2, train="norms")
    ends = {}
    for weight in (0.0, 10.0):
        m, teach = setup()
        start = hidden_error(m)
        history = distill.distill(m, teach, WINDOWS, distill.Config(**cfg, hidden_mse=weight),
                                  hidden_teacher=tiny_llama() if weight else None)
        assert history[-1] < history[0]
        ends[weight] = hidden_error(m)
    assert ends[10.0] < min(ends[0.0], start)
    m, teach = setup()
    with pytest.raises(compress.CompressError, match="hidden_teacher"):
        distill.distill(m, teach, WINDOWS, distill.Config(steps=1, hidden_mse=1.0))


def test_generated_windows_continue_the_prompts_and_are_reproducible() -> None:
    prompts = WINDOWS[:, :8]
    a = teacher.generate(tiny_llama(), prompts, 32, 3, torch.device("cpu"), seed=5)
    assert a.shape == (8, 32) and torch.equal(a[:, :8], prompts)
    assert not torch.equal(a[:, 8:], WINDOWS[:, 8:])
    assert torch.equal(a, teacher.generate(tiny_llama(), prompts, 32, 3, torch.device("cpu"), seed=5))


def test_pipeline_distills_on_teacher_written_text_and_keeps_it_for_a_resumed_run(tmp_path: Path) -> None:
    kd = "distill={steps: 6, windows_per_step: 8, batch_size: 8, lr: 0.01, warmup: 1, topk: 0, data: generated, "
    edits = ("weights.bits=2", kd + "prompt_tokens: 8}")
    work = WorkDir(tmp_path, {"recipe": "generated"})
    res = run(tiny_llama(), "rtn-4bit", edits, workdir=work)
    assert res.distilled["data"] == "generated" and res.distilled["kl_last"] < res.distilled["kl_first"]
    from safetensors.torch import load_file

    stored = load_file(work.dir / "distill-windows.safetensors")["ids"]
    assert stored.shape == (8, 32)
    calib = data.calibration(None, "random", 8, 32, 0, vocab_size=tiny_llama().config.vocab_size).ids
    assert torch.equal(stored[:, :8], calib[:, :8]) and not torch.equal(stored, calib)
    with pytest.raises(compress.CompressError, match="prompt_tokens"):
        run(tiny_llama(), "rtn-4bit", ("weights.bits=2", kd + "prompt_tokens: 32}"))


ISS = ("distill={steps: 12, windows_per_step: 8, batch_size: 8, lr: 0.001, warmup: 1, topk: 0, train: weights, "
       "sparsity: 0.5, per_row: true, iss_alpha: 0.5, prune_steps: 6}")


def test_iss_p_in_a_recipe_prunes_before_rounding_and_stores_the_mask_compactly(tmp_path: Path) -> None:
    """train=weights with sparsity in a recipe trains (ISS-P) before GPTQ rounds: half of every row decodes
    to exactly 0 under a bitmask, the mask is the trained one (not the original magnitudes'), the result
    is nearer the dense model than one-shot magnitude pruning + GPTQ, and it saves and loads exactly."""
    oneshot = run(tiny_llama(), "gptq-4bit", ("weights.sparsity=0.5",)).model
    m = tiny_llama()
    res = run(m, "gptq-4bit", ("weights.sparsity=0.5", ISS))
    assert res.distilled["train"] == "weights" and res.distilled["steps"] == 12  # (it starts dense: KL 0 → up)
    moved = 0
    for n, mod in m.named_modules():
        if isinstance(mod, CompressedLinear):
            assert mod.spec.sparse and hasattr(mod, "keep_mask")
            kept = mod.dequantize() != 0
            assert bool((kept.sum(1) <= mod.in_features // 2).all())  # exactly half pruned (+ codes at 0)
            moved += int((kept & (oneshot.get_submodule(n).dequantize() == 0)).sum())
    assert moved > 0
    assert kl_to_dense(m) < kl_to_dense(oneshot)
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


@pytest.mark.parametrize(("edits", "needle"), [
    (("weights.sparsity=0.5", ISS.replace("per_row: true", "per_row: false")), "per_row"),
    (("weights.sparsity=0.25", ISS), "weights.sparsity=0.5"),
    (("weights.sparsity=0.5", "weights.prune=wanda", ISS), "weights.prune=magnitude"),
])
def test_pruned_training_whose_mask_the_rounding_would_not_keep_is_refused(edits: tuple[str, ...],
                                                                           needle: str) -> None:
    with pytest.raises(compress.CompressError, match=needle):
        run(tiny_llama(), "gptq-4bit", edits)


def test_ste_on_a_pruned_layer_keeps_its_mask_and_packs_the_kept_codes(tmp_path: Path) -> None:
    m, teach = setup("gptq-4bit", ("weights.sparsity=0.5",))
    zeros = {n: mod.dequantize() == 0 for n, mod in m.named_modules() if isinstance(mod, CompressedLinear)}
    seen = {}

    def last(p: distill.Progress) -> None:
        if p.step == p.steps:
            with torch.no_grad():
                seen["logits"] = m(WINDOWS).logits

    history = distill.distill(m, teach, WINDOWS, distill.Config(steps=10, windows_per_step=8, batch_size=8, lr=3e-3,
                                                                warmup=2, train="ste"), on_step=last)
    assert history[-1] < history[0]
    for n, mod in m.named_modules():
        if isinstance(mod, CompressedLinear):
            W = mod.dequantize()
            pruned = ~fmt.unpack_keep(mod.keep_mask, mod.in_features)
            assert bool((W[pruned] == 0).all()) and bool(zeros[n][pruned].all())
    with torch.no_grad():
        torch.testing.assert_close(m(WINDOWS).logits, seen["logits"], rtol=1e-5, atol=1e-6)
    res = run(tiny_llama(), "gptq-4bit", ("weights.sparsity=0.5",))
    checkpoint.save(m, None, res.plan, res.recipe, tmp_path, card="card")
    assert torch.equal(logits(compress.load(tmp_path)), logits(m))


def test_norms_are_found_by_structure_in_every_supported_architecture() -> None:
    """train=norms trains what the models call norms (RMSNorm, LayerNorm, Qwen3's q/k norms), nothing else."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Qwen3Config

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=64)
    for cfg in (LlamaConfig(**kw), Qwen3Config(**kw, head_dim=16),
                OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                          word_embed_proj_dim=32)):
        m = AutoModelForCausalLM.from_config(cfg)
        named = [n for n, mod in m.named_modules() if "norm" in type(mod).__name__.lower()]
        assert [n for n, mod in m.named_modules() if distill.is_norm(mod)] == named and named, cfg.model_type
