"""bitsandbytes reference points (compress/baselines.py) on a tiny random Llama: which Linears are replaced,
NF4 codes checked against the published codebook, int8 error, the bits accounting, and `compress eval --bnb`."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli, one_line_error, tiny_llama
from torch import nn

from compress import baselines
from compress.cli import main
from compress.errors import CompressError

bnb = pytest.importorskip("bitsandbytes")

# NF4 as published in QLoRA (Dettmers et al. 2023, appendix E), written out here rather than read from bitsandbytes
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
BLOCK_LINEARS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


def layer_io(model: nn.Module, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every block Linear of the dense model on `ids`."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [lin.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
             for name, lin in baselines.linears(model).items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def rel_errors(quantized: nn.Module, io: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    with torch.no_grad():
        return {n: float((quantized.get_submodule(n)(x) - y).norm() / y.norm()) for n, (x, y) in io.items()}


IDS = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))


def test_nf4_replaces_block_linears_with_codes_on_the_nf4_grid() -> None:
    dense = tiny_llama()
    io = layer_io(dense, IDS)
    q = baselines.bnb(copy.deepcopy(dense), "nf4")
    assert set(baselines.linears(q)) == set(io) and len(io) == BLOCK_LINEARS
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in baselines.linears(q).values())
    assert type(q.lm_head) is nn.Linear and type(q.model.embed_tokens) is nn.Embedding
    assert torch.equal(q.lm_head.weight, dense.lm_head.weight)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules()) == BLOCK_LINEARS

    assert torch.allclose(bnb.functional.get_4bit_type("nf4", device="cpu"), NF4)
    for name, lin in baselines.linears(q).items():  # before any forward (the CPU path may repack the codes)
        W = dense.get_submodule(name).weight.detach()
        qs = lin.weight.quant_state
        assert qs.blocksize == 64 and qs.quant_type == "nf4" and not qs.nested and qs.dtype == W.dtype
        deq = bnb.functional.dequantize_4bit(lin.weight.data, qs)
        assert deq.shape == W.shape
        w, d = W.reshape(-1, 64), deq.reshape(-1, 64)
        absmax = w.abs().amax(1, keepdim=True)  # computed here, not taken from the quant state
        assert torch.allclose(qs.absmax.reshape(-1, 1), absmax)
        on_grid = (d / absmax).unsqueeze(-1) - NF4
        assert on_grid.abs().amin(-1).max() < 1e-5, name  # every value is absmax_block x an NF4 level
        to_level = ((w / absmax).unsqueeze(-1) - NF4).abs()
        chosen = ((d / absmax).unsqueeze(-1) - NF4).abs().argmin(-1, keepdim=True)
        assert (to_level.gather(-1, chosen).squeeze(-1) <= to_level.amin(-1) + 1e-5).all(), name  # the nearest
        half_gap = float((NF4[1:] - NF4[:-1]).max()) / 2
        assert ((w - d).abs() <= absmax * half_gap + 1e-7).all(), name
        assert lin.compute_dtype == W.dtype

    errs = rel_errors(q, io)
    assert max(errs.values()) < 0.15, errs
    with torch.no_grad():
        assert (q(IDS).logits.argmax(-1) == dense(IDS).logits.argmax(-1)).float().mean() > 0.9


def test_int8_is_close_to_dense() -> None:
    dense = tiny_llama()
    io = layer_io(dense, IDS)
    q = baselines.bnb(copy.deepcopy(dense), "int8")
    mods = baselines.linears(q)
    assert len(mods) == BLOCK_LINEARS and all(isinstance(m, bnb.nn.Linear8bitLt) for m in mods.values())
    assert type(q.lm_head) is nn.Linear
    for name, lin in mods.items():
        W = dense.get_submodule(name).weight.detach()
        assert lin.weight.dtype == torch.int8 and lin.weight.SCB.shape == (W.shape[0],)
        assert lin.state.threshold == 6.0 and not lin.state.has_fp16_weights
        assert torch.allclose(lin.weight.SCB, W.abs().amax(1).half().float())
    errs = rel_errors(q, io)
    assert max(errs.values()) < 0.02, errs
    with torch.no_grad():
        ld, lq = dense(IDS).logits, q(IDS).logits
    assert float((lq - ld).norm() / ld.norm()) < 0.02
    assert torch.equal(lq.argmax(-1), ld.argmax(-1))


def test_bits_match_what_bitsandbytes_stores() -> None:
    assert baselines.bnb_bits("nf4", 576, 576) == (4.0, 4.5)
    assert baselines.bnb_bits("fp4", 192, 576) == (4.0, 4.5)
    assert baselines.bnb_bits("int8", 576, 1536) == (8.0, 8.0 + 32 / 1536)
    code, total = baselines.bnb_bits("nf4", 1, 100)  # 50 bytes of codes, two (partly filled) absmax blocks
    assert (code, total) == (4.0, (400 + 64) / 100)
    assert baselines.bnb_bits("nf4", 256, 256, double_quant=True)[1] == 4 + 8 / 64 + 32 / (64 * 256)

    model = tiny_llama()
    q = baselines.bnb(copy.deepcopy(model), "int8")
    stored = sum(m.weight.numel() * 8 + m.weight.SCB.numel() * 32 for m in baselines.linears(q).values())
    numel = sum(m.weight.numel() for m in baselines.linears(model).values())
    assert baselines.bits(model, "int8") == baselines.bits(q, "int8") == pytest.approx((8.0, stored / numel))
    q = baselines.bnb(copy.deepcopy(model), "nf4")
    stored = sum(m.weight.numel() * 8 + m.weight.quant_state.absmax.numel() * 32
                 for m in baselines.linears(q).values())
    assert baselines.bits(q, "nf4") == pytest.approx((4.0, stored / numel)) == (4.0, 4.5)


def test_unknown_kind_and_missing_bitsandbytes_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CompressError, match=r"unknown bitsandbytes kind 'nf5'; choose one of nf4, fp4, int8"):
        baselines.bnb(tiny_llama(), "nf5")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(CompressError, match=r"bitsandbytes is not installed; pip install 'bitsandbytes>=0.47"):
        baselines.bnb(tiny_llama(), "nf4")


def test_a_build_that_decodes_ragged_rows_with_the_wrong_scales_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes 0.49-0.50 on CPU decode 4-bit rows of K % 64 != 0 with other blocks' scales: stand in for
    such a build (every weight decoded with the next block's scale) and expect the one-line refusal."""
    real = baselines._convert

    def misdecode(b, lin: nn.Linear, kind: str, device, double_quant: bool) -> nn.Module:
        if kind == "int8" or lin.in_features % baselines.BLOCKSIZE == 0:
            return real(b, lin, kind, device, double_quant)
        blocks = lin.weight.detach().flatten().split(baselines.BLOCKSIZE)
        amax = torch.stack([blk.abs().amax() for blk in blocks])
        wrong = nn.Linear(lin.in_features, lin.out_features, bias=False)
        with torch.no_grad():  # block i decoded with block i + 1's absmax
            W = torch.cat([blk / a * n for blk, a, n in zip(blocks, amax, amax.roll(-1), strict=True)])
            wrong.weight.copy_(W.view_as(lin.weight))
        return wrong

    monkeypatch.setattr(baselines, "_convert", misdecode)
    with pytest.raises(CompressError, match=r"runs nf4 wrongly on cpu for Linears whose in_features is not a multiple "
                                            r"of 64 \(this model has 160\); pip install 'bitsandbytes>=0.47,<0.49'"):
        baselines.bnb(tiny_llama(), "nf4")
    assert baselines.bnb(tiny_llama(intermediate_size=192), "nf4") is not None  # no ragged rows: no check, no error


@pytest.fixture(scope="module")
def rtn_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bnb") / "rtn"
    main([str(tiny_llama_dir), "--recipe", "rtn-4bit", "--out", str(out), *FAST])
    return out


def test_eval_adds_bitsandbytes_entries(tiny_llama_dir: Path, rtn_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    report = tmp_path / "report.json"
    args = ["eval", str(tiny_llama_dir), str(rtn_dir), "--seqlen", "64", "--windows", "2",
            "--bnb", "nf4", "--bnb", "int8", "--json", str(report)]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "bnb nf4" in out and "bnb int8" in out and "MatMul8bitLt" not in err  # (the table wraps names)
    md = (rtn_dir / "eval-quick-pydoc-64x2.md").read_text()
    assert "| bnb nf4 (in memory) | 4.000 / 4.500 | - |" in md and "| bnb int8 (in memory) | 8.000 / 8.4" in md
    models = json.loads(report.read_text())["models"]
    assert [m["name"] for m in models[1:]] == ["rtn", "bnb nf4 (in memory)", "bnb int8 (in memory)"]
    nf4, int8 = models[2], models[3]
    assert nf4["bits"] == [4.0, 4.5]
    # K = 64 for q/k/v/gate/up, 160 for down_proj: 8 + 32/K by element count
    numel = {64: 64 * (64 + 32 + 32 + 64 + 160 + 160), 160: 64 * 160}
    assert int8["bits"][0] == 8.0 and int8["bits"][1] == pytest.approx(
        8 + sum(n * 32 / k for k, n in numel.items()) / sum(numel.values()))
    ppl = {m["name"]: m["tasks"]["ppl-pydoc-64x2"] for m in models}
    assert 0 < ppl["bnb int8 (in memory)"]["kl_mean"] < ppl["bnb nf4 (in memory)"]["kl_mean"]
    assert ppl["bnb int8 (in memory)"]["top1"] > 0.9
    assert len({m["fingerprint"] for m in models}) == 4

    code, _, _ = cli(args, capsys)  # the second run is served from the cache: same numbers
    assert code == 0 and json.loads(report.read_text())["models"] == models


def test_eval_unknown_bnb_kind_is_one_line(tiny_llama_dir: Path, rtn_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["eval", str(tiny_llama_dir), str(rtn_dir), "--bnb", "int4"], capsys)
    msg = one_line_error(err)
    assert code == 2 and "'int4'" in msg and "nf4, fp4, int8" in msg
