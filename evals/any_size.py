"""Any size on one machine (issue 19): compress random Llama-7B and -13B shaped models with GPTQ 4-bit within a
small RAM budget, and reload what was written.

Random weights measure memory and time, not quality: the generated text is meaningless, and the only check of the
reloaded model is that it runs and gives 8 new token ids.

1. Source checkpoints are written once into evals/.cache/any_size/{7b,13b} (a marker file, written last, says a
   folder is complete): Llama shapes (7B: 32 layers, hidden 4096, MLP 11008, 32 heads; 13B: 40 layers, 5120, 13824,
   40 heads) with SmolLM2's tokenizer (vocab 49152, untied lm_head), bf16 values drawn per tensor with a fixed seed
   (N(0, 0.02) for Linears and embeddings, ones for norms), one tensor at a time into ~2 GB safetensors shards with
   an index. The writer runs in its own process; its time and peak RSS are recorded in the marker.
2. `compress DIR --out OUT` + COMPRESS_FLAGS (4 x 512 calibration windows, batch 1, no quick check, 2 threads) in
   a fresh process, one at a time, with `--timeout` seconds each: wall time and the child's peak RSS (GNU
   `/usr/bin/time -v` where present, else the child's own rusage from wait4; a live VmHWM poll of the process tree
   backs both up, so a run killed by the timeout or the OOM killer still has a peak). Then OUT/config.json's
   quantization_config.stages ({stage: {seconds, peak_rss_mb}}) when the build writes it.
3. `compress plan DIR` with the same recipe edits, when the build has that command: its `estimated peak RAM: X GB`
   line against the measured peak.
4. Reload: `compress.load(OUT)` in a fresh process, then 8 greedy tokens after a short prompt: load seconds, peak
   RSS, and that 8 new token ids came out.

Targets: peak RSS of the compression <= 6 GB for 7B and <= 8 GB for 13B (GB = 1e9 bytes everywhere here). Parts
that need a newer build (the plan command, per-stage timing) print "not available in this build" instead.
Writes evals/results/any_size.{json,md} (rows merged by size, so `--sizes 13b` keeps the 7B row); compress logs go
to evals/.cache/any_size/logs, checkpoints to evals/.cache/any_size/out (deleted after measuring unless --keep).

    python evals/any_size.py                     # 7b then 13b (hours on 2 cores; ~14 + 26 GB of source on disk)
    python evals/any_size.py --sizes 7b --keep   # one size, keep its checkpoint
    python evals/any_size.py --render            # re-print the saved table
    python evals/any_size.py --sizes 13b --plan-only   # re-run only the plan's estimate for saved rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import fmt_num, merge, report

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).parent
CACHE = HERE / ".cache" / "any_size"
OUT_DIR = CACHE / "out"
LOGS = CACHE / "logs"
RESULTS = HERE / "results" / "any_size"
MARKER = ".any_size_complete.json"  # written last into a source folder: its presence means the folder is complete
RECIPE = "gptq-4bit"
EDITS = ["calibrate.samples=4", "calibrate.seqlen=512", "calibrate.batch_size=1"]
SETS = [a for e in EDITS for a in ("--set", e)]
COMPRESS_FLAGS = ["--recipe", RECIPE, *SETS, "--eval-windows", "0", "--threads", "2"]  # `compress compress --help`
STREAM_FLAGS = ["--stream", "on"]  # added where `compress compress --help` lists --stream: the low-memory path itself,
# not the RAM-dependent `auto` (which streams only when the model would take over half the memory available)
PLAN_FLAGS = ["--recipe", RECIPE, *SETS]
CLI = [sys.executable, "-m", "compress"]  # the `compress` entry point of this interpreter's install
PROMPT = "The quickest way to read a large file in Python is"
NEW_TOKENS = 8
SEED = 0
GB = 1e9
MB = 2**20  # the library's peak_rss_mb is MiB (VmHWM / 1024)
NA = "not available in this build"
PLAN_RE = re.compile(r"estimated peak RAM:\s*([0-9]+(?:\.[0-9]+)?)\s*(GB|GiB|MB|MiB)?", re.IGNORECASE)
UNITS = {"gb": 1e9, "gib": 2**30, "mb": 1e6, "mib": 2**20}


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    target_gb: float | None  # peak RSS budget of the compression
    shard_bytes: int = 2_000_000_000


SIZES: dict[str, Size] = {
    "7b": Size(32, 4096, 11008, 32, 32, 6.0),
    "13b": Size(40, 5120, 13824, 40, 40, 8.0),
    # the same shapes, two blocks deep: read block by block, the peak does not depend on depth (it is one block's
    # rounding), so these measure the 7B/13B peak and the plan's estimate in minutes instead of hours on 2 cores
    "7b-2l": Size(2, 4096, 11008, 32, 32, 6.0),
    "13b-2l": Size(2, 5120, 13824, 40, 40, 8.0),
    "tiny": Size(4, 256, 688, 4, 4, None, shard_bytes=8_000_000),  # hidden: a seconds-long end-to-end check
}
PUBLIC = ["7b", "13b"]


# ---------------------------------------------------------------- step 1: the source checkpoint (its own process)

def write_source(name: str) -> dict:
    """Write SIZES[name]'s random bf16 Llama into CACHE/name; return what the marker records."""
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress import models
    from compress.util import peak_rss_mb

    t0 = time.perf_counter()
    s = SIZES[name]
    folder = CACHE / name
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete folder (no marker): start again
    folder.mkdir(parents=True)
    ref = models.resolve("smollm2-135m")
    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(ref.source, gguf_file=ref.gguf_file)  # the tokenizer only, never the model
    tok.save_pretrained(folder)
    vocab = -(-len(tok) // 64) * 64
    config = LlamaConfig(vocab_size=vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):  # names and shapes only: no weight is ever allocated here
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    nbytes = {k: 2 * _numel(shape) for k, shape in shapes.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for k in shapes:  # greedy ~shard_bytes shards in state_dict order (a tensor larger than that is a shard alone)
        if shards[-1] and used + nbytes[k] > s.shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes[k]
    weight_map: dict[str, str] = {}
    order = {k: i for i, k in enumerate(shapes)}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        buf = {}
        for k in keys:
            buf[k] = _random_tensor(k, shapes[k], order[k])
            weight_map[k] = fname
        save_file(buf, folder / fname, metadata={"format": "pt"})
        del buf
    total = sum(nbytes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    info = {"size": name, "params": sum(_numel(v) for v in shapes.values()), "weights_bytes": total,
            "shards": len(shards), "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    (folder / MARKER).write_text(json.dumps(info, indent=1))  # last: the folder is complete
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _random_tensor(name: str, shape: tuple[int, ...], i: int) -> torch.Tensor:
    import torch

    if len(shape) == 1:  # norms are ones, any bias zeros
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(SEED * 100_003 + i)  # per tensor: the values do not depend on the sharding
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)


def source(name: str, timeout: float) -> dict:
    """The complete source folder of `name` (written now in a child process unless cached) and its marker."""
    folder = CACHE / name
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        print(f"{name}: source cached in {folder} ({_folder_bytes(folder) / GB:.2f} GB)", flush=True)
        return {**info, "cached": True}
    LOGS.mkdir(parents=True, exist_ok=True)
    print(f"{name}: writing the random source checkpoint into {folder} ...", flush=True)
    run = measured([sys.executable, __file__, "--job", "write", name], timeout, LOGS / f"{name}-write.log")
    if run["rc"] != 0 or not marker.is_file():
        raise SystemExit(f"{name}: writing the source failed ({_why(run)}); see {LOGS / f'{name}-write.log'}")
    info = json.loads(marker.read_text())
    info.update(wall_seconds=run["seconds"], child_peak_rss_mb=run["peak_rss_mb"])
    marker.write_text(json.dumps(info, indent=1))
    print(f"{name}: wrote {info['params'] / 1e9:.2f} B parameters in {info['shards']} shards, "
          f"{_folder_bytes(folder) / GB:.2f} GB, in {run['seconds']:.0f} s; writer peak RSS "
          f"{run['peak_rss_mb'] * MB / GB:.2f} GB", flush=True)
    return {**info, "cached": False}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------- measuring a child process

def _gnu_time() -> str | None:
    """/usr/bin/time when it is GNU time (-v, -o); None otherwise."""
    exe = "/usr/bin/time"
    if not os.access(exe, os.X_OK):
        return None
    try:
        p = subprocess.run([exe, "-v", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return exe if p.returncode == 0 else None


def _tree_hwm_kb(pid: int) -> int:
    """Largest VmHWM (KiB) in the process tree under `pid` right now (0 where /proc is unreadable)."""
    best, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return best


def measured(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run `cmd` alone (stdout and stderr into `log`), killing its process group after `timeout` s: exit code,
    wall seconds and the child's peak RSS in MiB (GNU time's maximum RSS where present, else wait4's rusage of
    this very child, never RUSAGE_CHILDREN's maximum over every child so far; the live VmHWM poll is the floor)."""
    gnu = _gnu_time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf, open(log, "w") as fh:
        full = [gnu, "-v", "-o", tf.name, *cmd] if gnu else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        polled, timed_out = 0, False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            polled = max(polled, _tree_hwm_kb(p.pid))
            if time.perf_counter() - t0 > timeout and not timed_out:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        report_text = Path(tf.name).read_text(errors="replace")
    Path(tf.name).unlink(missing_ok=True)
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", report_text)
    if m:
        kb, how = int(m.group(1)), "GNU time -v"
    else:  # no GNU time (or it was killed with the child): this child's own rusage (Linux: KiB)
        kb, how = usage.ru_maxrss, "wait4 rusage"
    if polled > kb * 1.01 + 1024:  # the primary figure missed the peak (a killed child): the poll's floor
        how = f"{how}, live VmHWM poll higher"
    kb = max(kb, polled)
    rc = p.returncode
    if gnu and not timed_out:  # GNU time exits with the child's code, or 128 + signal
        sig = re.search(r"Command terminated by signal (\d+)", report_text)
        rc = -int(sig.group(1)) if sig else rc
    return {"rc": rc, "seconds": seconds, "peak_rss_mb": kb / 1024, "timed_out": timed_out, "rss_method": how}


def _why(run: dict) -> str:
    if run["timed_out"]:
        return f"timed out after {run['seconds']:.0f} s"
    if run["rc"] < 0:
        return f"killed by signal {-run['rc']}" + (" (SIGKILL: out of memory?)" if run["rc"] == -9 else "")
    return f"exit {run['rc']}"


def _last_error(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
    err = [x for x in lines if x.startswith("error:") or "Error" in x]
    return (err or lines or [""])[-1][:300]


# ---------------------------------------------------------------- steps 2-4

def compress_size(name: str, folder: Path, timeout: float) -> dict:
    out = OUT_DIR / f"{name}-{RECIPE}"
    if out.exists():
        shutil.rmtree(out)  # a fresh measurement: never a resume of an earlier run
    log = LOGS / f"{name}-compress.log"
    flags = [*COMPRESS_FLAGS, *(STREAM_FLAGS if _has_option("compress", "--stream") else [])]
    cmd = [*CLI, str(folder), "--out", str(out), *flags]
    print(f"{name}: compress {folder.name} --out {out} {' '.join(flags)} (log: {log}) ...", flush=True)
    run = measured(cmd, timeout, log)
    row: dict = {"compress_cmd": " ".join(["compress", *cmd[len(CLI):]]), "compress_rc": run["rc"],
                 "compress_seconds": run["seconds"], "compress_peak_rss_mb": run["peak_rss_mb"],
                 "compress_timed_out": run["timed_out"], "rss_method": run["rss_method"], "out": str(out)}
    text = log.read_text(errors="replace") if log.is_file() else ""
    m = re.search(r"done in (\d+)s · peak RSS (\d+) MB", text)  # the CLI's own summary line
    if m:
        row["library_seconds"], row["library_peak_rss_mb"] = float(m.group(1)), float(m.group(2))
    ok = run["rc"] == 0 and (out / "config.json").is_file()
    if not ok:
        row["compress_error"] = f"{_why(run)}: {_last_error(log)}"
        print(f"{name}: compress failed ({row['compress_error']}) after {run['seconds']:.0f} s, peak RSS "
              f"{run['peak_rss_mb'] * MB / GB:.2f} GB", flush=True)
        return row
    print(f"{name}: compressed in {run['seconds']:.0f} s, peak RSS {run['peak_rss_mb'] * MB / GB:.2f} GB", flush=True)
    qc = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    stages = qc.get("stages")
    if isinstance(stages, dict) and stages:
        row["stages"] = {str(k): {f: float(v[f]) for f in ("seconds", "peak_rss_mb")
                                  if isinstance(v, dict) and isinstance(v.get(f), int | float)}
                         for k, v in stages.items()}
    row["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return row


def _help(*words: str) -> str:
    p = subprocess.run([*CLI, *words, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return p.stdout + p.stderr


def has_plan() -> bool:
    """Does this build's CLI list a `plan` command? (Older builds take `compress plan DIR` as a model named plan.)"""
    return bool(re.search(r"^\W*plan\s", _help(), re.MULTILINE))


def _has_option(command: str, option: str) -> bool:
    return bool(re.search(rf"(^|\W){re.escape(option)}(\W|$)", _help(command)))


def plan_size(name: str, folder: Path) -> dict:
    if not has_plan():
        print(f"{name}: compress plan: {NA}", flush=True)
        return {"plan_error": NA}
    log = LOGS / f"{name}-plan.log"
    # as the compression runs (block by block where it can), and without the block-0 timing probe where the build
    # can skip it (only the memory estimate is compared; the probe is one block of GPTQ: minutes at 13B)
    extra = [*(STREAM_FLAGS if _has_option("plan", "--stream") else []),
             *(["--no-probe"] if _has_option("plan", "--no-probe") else [])]
    cmd = [*CLI, "plan", str(folder), *PLAN_FLAGS, *extra]
    run = measured(cmd, 600, log)
    text = log.read_text(errors="replace") if log.is_file() else ""
    m = PLAN_RE.search(text)
    if run["rc"] != 0 or not m:
        why = f"failed, {_why(run)}: {_last_error(log)}" if run["rc"] != 0 else "no 'estimated peak RAM: X GB' line"
        print(f"{name}: compress plan: {why}", flush=True)
        return {"plan_error": why}
    est = float(m.group(1)) * UNITS[(m.group(2) or "GB").lower()] / GB
    print(f"{name}: compress plan estimates {est:.2f} GB peak RAM ({run['seconds']:.1f} s)", flush=True)
    return {"plan_estimate_gb": est, "plan_seconds": run["seconds"], "plan_line": m.group(0)}


def reload_job(out: str) -> dict:
    """In a fresh process: compress.load, then NEW_TOKENS greedy tokens after PROMPT."""
    import torch
    from transformers import AutoTokenizer

    import compress
    from compress.util import peak_rss_mb

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = compress.load(out)
    load_seconds = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    new = gen[0, ids.shape[1]:].tolist()
    vocab = model.config.vocab_size
    return {"load_seconds": load_seconds, "generate_seconds": time.perf_counter() - t0, "new_tokens": new,
            "generated_ok": len(new) == NEW_TOKENS and all(isinstance(t, int) and 0 <= t < vocab for t in new),
            "text": tok.decode(new), "dtype": str(model.dtype).removeprefix("torch."), "peak_rss_mb": peak_rss_mb()}


def reload_size(name: str, out: str, timeout: float) -> dict:
    log = LOGS / f"{name}-reload.log"
    run = measured([sys.executable, __file__, "--job", "reload", out], timeout, log)
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        res = None
    if run["rc"] != 0 or not isinstance(res, dict):
        err = f"{_why(run)}: {_last_error(log)}"
        print(f"{name}: reload failed ({err})", flush=True)
        return {"reload_error": err, "reload_peak_rss_mb": run["peak_rss_mb"], "generated_ok": False}
    print(f"{name}: reloaded in {res['load_seconds']:.1f} s, peak RSS {run['peak_rss_mb'] * MB / GB:.2f} GB, "
          f"{len(res['new_tokens'])} new tokens {res['new_tokens']}", flush=True)
    return {"reload_seconds": res["load_seconds"], "reload_wall_seconds": run["seconds"],
            "reload_peak_rss_mb": run["peak_rss_mb"], "generate_seconds": res["generate_seconds"],
            "new_tokens": res["new_tokens"], "generated_ok": res["generated_ok"], "reload_dtype": res["dtype"]}


def measure(name: str, timeout: float, keep: bool) -> dict:
    s = SIZES[name]
    src = source(name, timeout)
    folder = CACHE / name
    row: dict = {"label": name, "layers": s.layers, "hidden": s.hidden, "intermediate": s.intermediate,
                 "heads": s.heads, "target_gb": s.target_gb, "params": src["params"],
                 "source_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                 "writer": {k: src.get(k) for k in ("seconds", "wall_seconds", "peak_rss_mb", "child_peak_rss_mb")},
                 "cpu": _cpu(), "cores": os.cpu_count(), "ram_gb": _ram_gb(), "date": time.strftime("%Y-%m-%d")}
    row.update(plan_size(name, folder))
    row.update(compress_size(name, folder, timeout))
    if "compress_error" not in row:
        row.update(reload_size(name, row["out"], timeout))
        if not keep:
            shutil.rmtree(row["out"], ignore_errors=True)
            row["out"] = None
    return row


def _cpu() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                    if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                  if x.startswith("MemTotal:"))
        return kb * 1024 / GB
    except (OSError, StopIteration, ValueError):
        return None


# ---------------------------------------------------------------- the table

def _gb(mib: float | None) -> float | None:
    return None if mib is None else mib * MB / GB


def table(rows: list[dict]) -> str:
    lines = ["| size | layers x hidden (MLP) | params | source GB on disk | compress wall s | compress peak RSS GB | "
             "target | pass | plan estimate GB | estimate / measured | checkpoint GB | reload s | reload peak RSS GB | "
             f"generated {NEW_TOKENS} tokens |", "|" + "---|" * 14]
    for r in rows:
        peak = _gb(r.get("compress_peak_rss_mb"))
        target = r.get("target_gb")
        failed = "compress_error" in r
        if failed:
            rc = r.get("compress_rc")
            verdict = "fail (" + ("timeout" if r.get("compress_timed_out") else f"killed, signal {-rc}"
                                  if isinstance(rc, int) and rc < 0 else f"exit {rc}") + ")"
        elif target is None:
            verdict = "-"
        else:
            verdict = "pass" if peak is not None and peak <= target else "fail"
        est = r.get("plan_estimate_gb")
        ratio = f"{est / peak:.2f}" if est is not None and peak else "-"
        plan = fmt_num(est, ".2f") if est is not None else (r.get("plan_error") or NA)
        if "reload_error" in r:
            gen = f"no ({r['reload_error'][:80]})"
        elif failed:
            gen = "- (no checkpoint)"
        else:
            gen = "yes" if r.get("generated_ok") else "no"
        wall = fmt_num(r.get("compress_seconds"), ".0f") + (" (killed)" if r.get("compress_timed_out") else "")
        lines.append(
            f"| {r['label']} | {r['layers']} x {r['hidden']} ({r['intermediate']}) | {r['params'] / 1e9:.2f} B | "
            f"{r['source_bytes'] / GB:.2f} | {wall} | {fmt_num(peak, '.2f')} | "
            f"{'-' if target is None else f'<= {target:g}'} | {verdict} | {plan} | {ratio} | "
            f"{fmt_num(r['checkpoint_bytes'] / GB if r.get('checkpoint_bytes') else None, '.2f')} | "
            f"{fmt_num(r.get('reload_seconds'), '.1f')} | {fmt_num(_gb(r.get('reload_peak_rss_mb')), '.2f')} | "
            f"{gen} |")
    staged = [r for r in rows if r.get("stages")]
    done = [r for r in rows if "compress_error" not in r and "compress_seconds" in r]
    if staged:
        lines += ["", "Per stage (OUT/config.json quantization_config.stages):", "",
                  "| size | stage | seconds | share of compress wall | peak RSS GB |", "|---|---|---|---|---|"]
        for r in staged:
            for stage, v in r["stages"].items():
                sec = v.get("seconds")
                share = f"{sec / r['compress_seconds']:.0%}" if sec is not None and r.get("compress_seconds") else "-"
                lines.append(f"| {r['label']} | {stage} | {fmt_num(sec, '.1f')} | {share} | "
                             f"{fmt_num(_gb(v.get('peak_rss_mb')), '.2f')} |")
            wall, inside = r.get("compress_seconds"), sum(v.get("seconds", 0.0) for v in r["stages"].values())
            if wall:  # what no stage covers: interpreter start-up, loading, checking the work folder, saving
                lines.append(f"| {r['label']} | (outside the stages: start-up, load, save) | {wall - inside:.1f} | "
                             f"{(wall - inside) / wall:.0%} | - |")
    elif done:
        lines += ["", f"Per-stage timing: {NA} (the checkpoints' config.json has no quantization_config.stages)."]
    errors = [f"- {r['label']}: compress {r['compress_error']}" for r in rows if "compress_error" in r]
    if errors:
        lines += ["", "Failures (logs in evals/.cache/any_size/logs):", "", *errors]
    writers = [r for r in rows if (r.get("writer") or {}).get("peak_rss_mb") is not None]
    if writers:
        lines += ["", "Source writer (random bf16 weights, one tensor at a time + one shard buffer): " + "; ".join(
            f"{r['label']} {fmt_num(r['writer'].get('wall_seconds') or r['writer'].get('seconds'), '.0f')} s, peak "
            f"RSS {fmt_num(_gb(r['writer'].get('child_peak_rss_mb') or r['writer']['peak_rss_mb']), '.2f')} GB"
            for r in writers) + "."]
    methods = sorted({r["rss_method"] for r in rows if r.get("rss_method")})
    if methods:
        lines += ["", f"Peak RSS measured with: {', '.join(methods)}."]
    return "\n".join(lines)


INTRO = ("Command: `python evals/any_size.py`. Random Llama-shaped bf16 checkpoints (SmolLM2 tokenizer, vocab 49152, "
         "untied lm_head) compressed with `compress DIR --recipe gptq-4bit " + " ".join(COMPRESS_FLAGS[2:]) + "` in "
         "a fresh process each, one at a time (plus `--stream on` where the build has it); then `compress.load` and 8 "
         "greedy tokens in another fresh process. "
         "**Random weights measure memory and time, not quality**: the text is meaningless, `generated` only checks "
         "that 8 new token ids came out. GB = 1e9 bytes; peak RSS is the child process's maximum resident set. "
         "`pass`: the compression's peak RSS within the target (7B <= 6 GB, 13B <= 8 GB) and a checkpoint written. "
         "Rows `7b-2l` / `13b-2l` are the same shapes two blocks deep (`--sizes 7b-2l 13b-2l`, minutes): read block by "
         "block, the peak is one block's rounding whatever the depth (since the driver hands freed heap memory back "
         "to the OS after each block: before that, glibc's retained heap took the full 7B from 5.5 GB at two blocks "
         "to 7.25 GB at 32), so they measure the full models' peaks and the plan's estimate; the full-depth rows take "
         "hours of GPTQ on 2 cores. Builds: the 7b row predates GPTQ reading the Hessian without a copy (one [K, K] "
         "float32 matrix less: 0.48 GB for the 7B's down_proj, 0.76 GB for the 13B's) and the plan's matching "
         "workspace term; every other row, and every plan estimate but the 7b's, is from the build after it "
         "(`--plan-only` re-runs only the estimates).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=PUBLIC, metavar="SIZE",
                    help="7b and/or 13b (default: both); 7b-2l, 13b-2l: the same shapes two blocks deep")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per compress (and reload) run")
    ap.add_argument("--keep", action="store_true", help="keep the compressed checkpoints in evals/.cache/any_size/out")
    ap.add_argument("--render", action="store_true", help="re-print the saved table")
    ap.add_argument("--plan-only", action="store_true",
                    help="re-run only `compress plan` for --sizes and update the estimate in their saved rows")
    ap.add_argument("--out", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        kind, arg = args.job
        print(json.dumps(write_source(arg) if kind == "write" else reload_job(arg)))
        return
    saved = args.out.with_suffix(".json")
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    order = list(SIZES)
    if args.plan_only:
        for name in args.sizes:
            row = next((r for r in rows if r["label"] == name), None)
            if row is None:
                raise SystemExit(f"{name}: no saved row to update; measure it first (--sizes {name})")
            source(name, args.timeout)
            row = {k: v for k, v in row.items() if not k.startswith("plan_")} | plan_size(name, CACHE / name)
            rows = merge(saved, row, order)
    elif not args.render:
        for name in args.sizes:
            rows = merge(saved, measure(name, args.timeout, args.keep), order)
    report(args.out, "Any size on one machine: random Llama 7B / 13B, GPTQ 4-bit", INTRO, table(rows))


if __name__ == "__main__":
    main()
