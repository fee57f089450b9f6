"""Damaged or tampered checkpoints (bits, keys, dtypes, shards, plan)

Every load path (compress.load, from_pretrained through the registered quantizer, `compress verify`, `compress
eval`, `compress export`) checks the files against the plan and the checksums written at save time, and refuses a
damaged checkpoint in one line naming the tensor; a clean one loads to the logits that were saved.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import Verdict, cli, logits, one_line_error, run, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

import compress
from compress import checkpoint, digest, recipe, verify
from compress.errors import CompressError

PACKED = ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.scale",
          "model.layers.1.mlp.down_proj.zero"]
DENSE = ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A GPTQ 4-bit tiny Llama saved as a checkpoint, and the logits of the model that was saved."""
    m = tiny_llama()
    res = run(m)
    out = tmp_path_factory.mktemp("ckpt") / "gptq"
    checkpoint.save(m, tiny_tokenizer(), res.plan, recipe.load("gptq-4bit"), out, card="test")
    return out, logits(m)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = tiny_llama()
    res = run(m, "rtn-4bit")
    out = tmp_path_factory.mktemp("ckpt") / "sharded"
    checkpoint.save(m, None, res.plan, recipe.load("rtn-4bit"), out, card="test", max_shard_size="40KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _file_of(d: Path, key: str) -> Path:
    return next(f for f in verify.weight_files(d) if key in digest.safetensors_header(f)[0])


def _flip_bit(d: Path, key: str, byte: int = 0, bit: int = 3) -> None:
    """Flip one bit of one tensor's data in place (what a bad disk or copy does)."""
    f = _file_of(d, key)
    header, start = digest.safetensors_header(f)
    lo, hi = header[key]["data_offsets"]
    pos = start + lo + byte % (hi - lo)
    data = bytearray(f.read_bytes())
    data[pos] ^= 1 << bit
    f.write_bytes(bytes(data))


def _rewrite(d: Path, key: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the file holding `key` with `change` applied to its tensors (a tool that edits checkpoints)."""
    f = _file_of(d, key)
    sd = load_file(f)
    change(sd)
    save_file(sd, f, metadata={"format": "pt"})


def _refused(load: Callable[[], object], match: str) -> str:
    with pytest.raises(CompressError, match=match) as e:
        load()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_clean_checkpoint_loads_to_the_saved_logits(saved: tuple[Path, torch.Tensor], verdict: Verdict) -> None:
    d, want = saved
    assert torch.equal(logits(checkpoint.load(d)), want)
    assert torch.equal(logits(checkpoint.load(d, verify_digests=False)), want)
    verdict("correct")


def test_checksums_cover_every_tensor(saved: tuple[Path, torch.Tensor], verdict: Verdict) -> None:
    sums = json.loads((saved[0] / verify.CHECKSUMS).read_text())["files"]
    header, _ = digest.safetensors_header(saved[0] / "model.safetensors")
    assert set(sums["model.safetensors"]) == set(header)
    sd = load_file(saved[0] / "model.safetensors")  # an independent SHA-256 of each tensor's bytes
    import hashlib
    for key, t in sd.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert sums["model.safetensors"][key] == hashlib.sha256(raw).hexdigest(), key
    verdict("correct")


@pytest.mark.parametrize("key", PACKED + DENSE)
@pytest.mark.parametrize("route", ["compress.load", "from_pretrained"])
def test_a_flipped_bit_is_caught_naming_the_tensor(saved: tuple[Path, torch.Tensor], tmp_path: Path, key: str,
                                                   route: str, verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _flip_bit(d, key, byte=17)
    if route == "compress.load":
        _refused(lambda: checkpoint.load(d), f"tensor {key} in model.safetensors does not match its checksum")
    else:
        from transformers import AutoModelForCausalLM

        _refused(lambda: AutoModelForCausalLM.from_pretrained(d), f"{key} .*does not match its checksum")
    verdict("error")


@pytest.mark.parametrize("key", PACKED + DENSE[1:])
def test_a_missing_tensor_is_named(saved: tuple[Path, torch.Tensor], tmp_path: Path, key: str,
                                   verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _rewrite(d, key, lambda sd: sd.pop(key))
    _refused(lambda: checkpoint.load(d), f"does not match its plan: tensor {key} is missing")
    verdict("error")


def test_an_unexpected_tensor_is_named(saved: tuple[Path, torch.Tensor], tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _rewrite(d, PACKED[0], lambda sd: sd.update({"model.layers.0.backdoor": torch.zeros(3)}))
    _refused(lambda: checkpoint.load(d), "tensor model.layers.0.backdoor in model.safetensors is not part of the model")
    verdict("error")


@pytest.mark.parametrize("key,dtype", [(PACKED[0], torch.int64), (PACKED[1], torch.float32), (PACKED[2], torch.int32),
                                       (DENSE[0], torch.int32)])
def test_a_wrong_dtype_is_named(saved: tuple[Path, torch.Tensor], tmp_path: Path, key: str, dtype: torch.dtype,
                                verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _rewrite(d, key, lambda sd: sd.update({key: sd[key].to(dtype)}))
    _refused(lambda: checkpoint.load(d), f"tensor {key} in model.safetensors is")
    verdict("error")


@pytest.mark.parametrize("key", PACKED + DENSE[:2])
def test_a_wrong_shape_is_named(saved: tuple[Path, torch.Tensor], tmp_path: Path, key: str, verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _rewrite(d, key, lambda sd: sd.update({key: sd[key][:-1].contiguous()}))
    _refused(lambda: checkpoint.load(d), f"tensor {key} in model.safetensors has shape")
    verdict("error")


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_a_truncated_file_is_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, keep: int,
                                      verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    _refused(lambda: checkpoint.load(d), "model.safetensors is (corrupt|truncated)")
    verdict("error")


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2]", b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": '
                                    b'[4, 0]}}', b'{"x": {"dtype": "F32"}}'])
def test_a_garbled_header_is_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, header: bytes,
                                      verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + f.read_bytes()[8:])
    _refused(lambda: checkpoint.load(d), "model.safetensors is corrupt")
    verdict("error")


def test_a_clean_sharded_checkpoint_loads(sharded: Path, verdict: Verdict) -> None:
    assert isinstance(checkpoint.load(sharded).model.layers[1].mlp.down_proj, compress.CompressedLinear)
    verdict("correct")


def test_a_missing_shard_is_named(sharded: Path, tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(sharded, tmp_path)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    _refused(lambda: checkpoint.load(d), f"missing weight shard {victim.name}")
    _refused(lambda: checkpoint.inspect(d), f"missing weight shard {victim.name}")
    verdict("error")


def test_a_flipped_bit_in_a_shard_is_named(sharded: Path, tmp_path: Path, verdict: Verdict) -> None:
    d = _copy(sharded, tmp_path)
    _flip_bit(d, "model.layers.1.mlp.up_proj.scale", byte=3)
    _refused(lambda: checkpoint.load(d), "model.layers.1.mlp.up_proj.scale in model-.* does not match its checksum")
    verdict("error")


@pytest.mark.parametrize("text", ["{", '{"weight_map": 3}', "[]"])
def test_a_corrupt_shard_index_is_one_line(sharded: Path, tmp_path: Path, text: str, verdict: Verdict) -> None:
    d = _copy(sharded, tmp_path)
    (d / verify.INDEX).write_text(text)
    _refused(lambda: checkpoint.load(d), "index.json is corrupt")
    verdict("error")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_scale_is_named_even_with_matching_checksums(saved: tuple[Path, torch.Tensor], tmp_path: Path,
                                                                  value: float, verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    key = PACKED[1]
    _rewrite(d, key, lambda sd: sd[key].view(-1).__setitem__(0, value))
    verify.write_checksums(d)  # a tool that wrote NaN scales and fresh checksums
    _refused(lambda: checkpoint.load(d), f"{key.removesuffix('.scale')}.scale holds 1 NaN/Inf")
    _refused(lambda: checkpoint.inspect(d), f"{key} holds 1 NaN/Inf")
    verdict("error")


def _edit_config(d: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


PLAN_EDITS = {
    "a module the model lacks": (lambda qc: qc["plan"].update({"model.layers.7.mlp.fc9": qc["plan"]
                                                               ["model.layers.0.mlp.up_proj"]}), "does not fit"),
    "a norm planned as a Linear": (lambda qc: qc["plan"].update({"model.norm": qc["plan"]
                                                                 ["model.layers.0.mlp.up_proj"]}), "does not fit"),
    "a width the files do not hold": (lambda qc: qc["plan"]["model.layers.0.mlp.up_proj"].update({"bits": 3}),
                                      "up_proj.qweight in model.safetensors has shape"),
    "a group size the files do not hold": (lambda qc: qc["plan"]["model.layers.0.mlp.up_proj"].update(
        {"group_size": 16}), "up_proj.(scale|qweight) in model.safetensors has shape"),
    "symmetry flipped": (lambda qc: qc["plan"]["model.layers.0.mlp.up_proj"].update({"symmetric": True}),
                         "up_proj.zero in model.safetensors is not part of the model"),
    "an invalid width": (lambda qc: qc["plan"]["model.layers.0.mlp.up_proj"].update({"bits": 99}), "does not fit"),
    "a Linear dropped from the plan": (lambda qc: qc["plan"].pop("model.layers.0.mlp.up_proj"),
                                       "up_proj.weight is missing"),
    "a plan that is not a mapping": (lambda qc: qc.update({"plan": [1, 2]}), "does not fit"),
    "a format version from the future": (lambda qc: qc.update({"format_version": 99}), "newer than this compress"),
    "a format version that is not a number": (lambda qc: qc.update({"format_version": "x"}), "invalid format_version"),
}


@pytest.mark.parametrize("what", PLAN_EDITS)
def test_a_tampered_plan_is_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, what: str,
                                     verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    edit, match = PLAN_EDITS[what]
    _edit_config(d, lambda cfg: edit(cfg["quantization_config"]))
    _refused(lambda: checkpoint.load(d), match)
    verdict("error")


@pytest.mark.parametrize("text", ["{not json", "[]", "\xff\xfe"])
def test_a_corrupt_config_is_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, text: str,
                                      verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    (d / "config.json").write_bytes(text.encode("latin-1"))
    _refused(lambda: checkpoint.load(d), "config.json is not")
    verdict("error")


@pytest.mark.parametrize("text", ["{", '{"files": 3}', '{"algorithm": "sha256"}'])
def test_corrupt_checksums_are_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, text: str,
                                        verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    (d / verify.CHECKSUMS).write_text(text)
    _refused(lambda: checkpoint.load(d), "checksums.json is corrupt")
    verdict("error")


def test_no_checksums_loads_with_a_warning(saved: tuple[Path, torch.Tensor], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture, verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    (d / verify.CHECKSUMS).unlink()
    with caplog.at_level("WARNING"):
        assert torch.equal(logits(checkpoint.load(d)), saved[1])
    assert "tensor data is not verified" in caplog.text
    verdict("correct")


def test_no_verify_skips_only_the_checksums(saved: tuple[Path, torch.Tensor], tmp_path: Path,
                                            verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _flip_bit(d, DENSE[2], byte=2, bit=0)  # a low mantissa bit of a norm: loads, slightly different
    checkpoint.load(d, verify_digests=False)
    _rewrite(d, PACKED[0], lambda sd: sd.pop(PACKED[0]))
    _refused(lambda: checkpoint.load(d, verify_digests=False), "is missing")  # the structure is always checked
    verdict("error")


def test_verify_command_passes_a_clean_checkpoint_and_names_runtimes(saved: tuple[Path, torch.Tensor],
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     verdict: Verdict) -> None:
    code, out, err = cli(["verify", str(saved[0])], capsys)
    assert code == 0, err
    assert "every tensor matches checksums.json" in err and "compress.load" in out
    assert "compressed-tensors" in out and "gptq" in out
    verdict("correct")


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing config", "empty folder", "not a folder"])
def test_verify_command_refuses_damage_in_one_line(saved: tuple[Path, torch.Tensor], tmp_path: Path, damage: str,
                                                   capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    if damage == "flip":
        _flip_bit(d, PACKED[1])
    elif damage == "truncate":
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-9])
    elif damage == "missing config":
        (d / "config.json").unlink()
    elif damage == "empty folder":
        shutil.rmtree(d)
        d.mkdir()
    else:
        d = d / "README.md"
    code, _, err = cli(["verify", str(d)], capsys)
    assert code == 2
    one_line_error(err)
    verdict("error")


def test_export_and_eval_refuse_a_damaged_checkpoint(tiny_llama_dir: Path, saved: tuple[Path, torch.Tensor],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     verdict: Verdict) -> None:
    d = _copy(saved[0], tmp_path)
    _flip_bit(d, PACKED[0])
    code, _, err = cli(["export", str(d), "--format", "gptq", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not match its checksum" in one_line_error(err)
    assert not (tmp_path / "x").exists()
    code, _, err = cli(["eval", str(tiny_llama_dir), str(d), "--windows", "1", "--seqlen", "16", "--no-cache"], capsys)
    assert code == 2 and "does not match its checksum" in one_line_error(err)
    verdict("error")


def test_the_eval_cache_keys_on_content(saved: tuple[Path, torch.Tensor], tmp_path: Path, verdict: Verdict) -> None:
    from compress import suite

    d = _copy(saved[0], tmp_path)
    files = lambda: [*sorted(d.glob("*.safetensors")), d / "config.json"]  # noqa: E731
    before = suite.fingerprint("checkpoint", files=files())
    moved = Path(shutil.move(d, tmp_path / "renamed"))
    d = moved
    assert suite.fingerprint("checkpoint", files=files()) == before  # a rename or a copy keeps the cache
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data)  # same content, new mtime
    assert suite.fingerprint("checkpoint", files=files()) == before
    _flip_bit(d, PACKED[0])  # same name, size and (on coarse clocks) mtime: a different model
    assert suite.fingerprint("checkpoint", files=files()) != before
    verdict("correct")


@pytest.mark.parametrize("text", ["{", "[1]", "\xff"])
def test_a_garbled_eval_cache_entry_is_recomputed(tmp_path: Path, text: str, verdict: Verdict) -> None:
    from compress import suite

    store = suite.Cache(tmp_path)
    store.put("fp", "ppl", {"ppl": 3.0})
    assert store.get("fp", "ppl") == {"ppl": 3.0}
    (tmp_path / "fp" / "ppl.json").write_bytes(text.encode("latin-1"))
    assert store.get("fp", "ppl") is None  # treated as missing: the task runs again and overwrites it
    verdict("correct")


@pytest.mark.parametrize("occupant", ["file", "other files", "a gptq export", "a compress checkpoint"])
def test_an_export_never_overwrites_what_is_not_its_own(saved: tuple[Path, torch.Tensor], tmp_path: Path,
                                                       occupant: str, capsys: pytest.CaptureFixture[str],
                                                       verdict: Verdict) -> None:
    target = tmp_path / "target"
    if occupant == "file":
        target.write_text("precious")
    elif occupant == "other files":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    elif occupant == "a gptq export":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    else:
        shutil.copytree(saved[0], target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if target.is_dir() else target.read_bytes()
    args = ["export", str(saved[0]), "--format", "compressed-tensors", "--out", str(target)]
    code, _, err = cli(args, capsys)
    assert code == 2 and "choose" in one_line_error(err)
    after = {p.name: p.read_bytes() for p in target.iterdir()} if target.is_dir() else target.read_bytes()
    assert after == before  # untouched
    if occupant == "other files":  # --force writes beside them (a checkpoint of another kind is never overwritten)
        code, _, err = cli([*args, "--force"], capsys)
        assert code == 0 and (target / "notes.txt").read_text() == "precious", err
    verdict("error")


def test_an_export_may_rewrite_its_own_format(saved: tuple[Path, torch.Tensor], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], verdict: Verdict) -> None:
    args = ["export", str(saved[0]), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]
    assert cli(args, capsys)[0] == 0
    first = (tmp_path / "ct" / "model.safetensors").read_bytes()
    assert cli(args, capsys)[0] == 0
    assert (tmp_path / "ct" / "model.safetensors").read_bytes() == first
    verdict("correct")
