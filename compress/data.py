"""Token windows for calibration and evaluation.

Sources (`name`):
    pydoc      CPython's `pydoc_data.topics`, joined in sorted key order with blank lines: about 465 KB
               of English prose, always on disk. Evaluation windows start at token 0; calibration
               windows start at token 60·512 = 30720, so the two never overlap (../shared/protocol.md).
    wikitext2  wikitext-2-raw-v1 (train for calibration, test for evaluation), joined with "\\n\\n".
    c4         allenai/c4 "en" shards used by GPTQ (train shard 0 for calibration: random documents
               of at least seqlen tokens; validation shard 0, first 1100 documents joined, for eval).
    ptb        ptb_text_only (train / test sentences joined with spaces).
    <path>     a local UTF-8 text file (calibration: random windows; evaluation: from the start).
    random     uniformly random token ids (tests; no tokenizer text involved).

Calibration from hub datasets follows GPTQ: `random.seed(seed)`, then per sample a random window of
`seqlen` tokens. Evaluation always takes consecutive non-overlapping windows from the start.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compress.errors import CompressError

log = logging.getLogger(__name__)

HUB_DATASETS = ("wikitext2", "c4", "ptb")
DATASETS = ("pydoc", *HUB_DATASETS, "random")
PYDOC_CALIB_START = 60 * 512


@dataclass(frozen=True)
class Windows:
    """A batch of token windows [n, seqlen] with a record of where they came from."""

    ids: Tensor
    source: str

    def __len__(self) -> int:
        return self.ids.shape[0]

    def describe(self) -> str:
        return f"{len(self)} × {self.ids.shape[1]} tokens from {self.source}"


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _tokenize(tokenizer: Any, text: str) -> Tensor:
    """One tokenizer call over the whole text, as the GPTQ protocol does."""
    import transformers

    transformers.logging.set_verbosity_error()  # "sequence longer than model max length" is expected here
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    transformers.logging.set_verbosity_warning()
    return ids


def _consecutive(ids: Tensor, start: int, n: int | None, seqlen: int, source: str) -> Windows:
    available = max(ids.numel() - start, 0) // seqlen
    if available < 1:
        raise CompressError(f"{source} holds {max(ids.numel() - start, 0)} tokens from token {start}, too few for "
                            f"one window of {seqlen}; use a longer text or a shorter sequence length")
    if n is None:
        n = available
    if n > available or n < 1:
        raise CompressError(f"{source} has room for {available} windows of {seqlen} tokens from token {start}, "
                            f"but {n} were asked for; lower the sample count or the sequence length")
    return Windows(ids[start : start + n * seqlen].view(n, seqlen).clone(), source)


def _random_windows(ids: Tensor, n: int, seqlen: int, seed: int, source: str) -> Windows:
    if ids.numel() <= seqlen:
        raise CompressError(f"{source} holds {ids.numel()} tokens, too few for windows of {seqlen}; use a longer "
                            "text or a shorter calibrate.seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    return Windows(torch.stack([ids[s : s + seqlen] for s in starts]), source)


def _load_hub(name: str, split: str) -> Any:
    """Load a hub dataset split, turning 'offline and not cached' into one actionable line."""
    import datasets

    args: dict[str, tuple[tuple, dict]] = {
        "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}),
        "ptb": (("ptb-text-only/ptb_text_only",), {}),
        "c4": (("allenai/c4",), {"data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz"}}),
    }
    pos, kw = args[name]
    try:
        return datasets.load_dataset(*pos, split=split, **kw)
    except Exception as e:  # datasets raises many types for "no network": ConnectionError, OSError, ...
        raise CompressError(
            f"dataset {name!r} ({split}) is not in the local cache and could not be downloaded ({type(e).__name__}); "
            "run once on a machine with network access, or use --calib pydoc / a local text file"
        ) from e


def _hub_text(name: str, split: str) -> str:
    d = _load_hub(name, split)
    if name == "wikitext2":
        return "\n\n".join(d["text"])
    if name == "ptb":
        return " ".join(d["sentence"])
    return " ".join(d[:1100]["text"])  # c4 validation: GPTQ's "c4-new" evaluation text


def calibration(tokenizer: Any, name: str, samples: int, seqlen: int, seed: int = 0,
                vocab_size: int | None = None) -> Windows:
    """`samples` calibration windows of `seqlen` tokens from source `name`."""
    if name == "random":
        if vocab_size is None:
            raise ValueError("random calibration needs vocab_size")
        g = torch.Generator().manual_seed(seed)
        return Windows(torch.randint(0, vocab_size, (samples, seqlen), generator=g), f"random(seed={seed})")
    if name == "pydoc":
        return _consecutive(_tokenize(tokenizer, pydoc_text()), PYDOC_CALIB_START, samples, seqlen,
                            f"pydoc (from token {PYDOC_CALIB_START})")
    if name == "c4":
        return _c4_calibration(tokenizer, samples, seqlen, seed)
    if name in HUB_DATASETS:
        return _random_windows(_tokenize(tokenizer, _hub_text_train(name)), samples, seqlen, seed, f"{name} train")
    return _random_windows(_tokenize(tokenizer, _local_text(name)), samples, seqlen, seed, name)


def evaluation(tokenizer: Any, name: str, seqlen: int, windows: int | None = None,
               vocab_size: int | None = None) -> Windows:
    """Consecutive non-overlapping windows from the start of the evaluation text (all if windows=None)."""
    if name == "random":
        g = torch.Generator().manual_seed(1234)
        return Windows(torch.randint(0, vocab_size or 256, (windows or 4, seqlen), generator=g), "random")
    if name == "pydoc":
        text, source = pydoc_text(), "pydoc"
    elif name in HUB_DATASETS:
        text, source = _hub_text(name, "validation" if name == "c4" else "test"), f"{name} eval"
    else:
        text, source = _local_text(name), name
    return _consecutive(_tokenize(tokenizer, text), 0, windows, seqlen, source)


def _hub_text_train(name: str) -> str:
    d = _load_hub(name, "train")
    return "\n\n".join(d["text"]) if name == "wikitext2" else " ".join(d["sentence"])


def _c4_calibration(tokenizer: Any, samples: int, seqlen: int, seed: int) -> Windows:
    """GPTQ's c4 sampling: random documents longer than seqlen, a random window inside each."""
    d = _load_hub("c4", "train")
    rng = random.Random(seed)
    out = []
    while len(out) < samples:
        ids = tokenizer(d[rng.randint(0, len(d) - 1)]["text"], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            s = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[s : s + seqlen])
    return Windows(torch.stack(out), "c4 train")


def check_source(name: str) -> None:
    """Fail fast on a local text file that cannot serve as a dataset (missing, a directory, unreadable, not
    UTF-8, empty), before minutes go into loading a model; the built-in sources pass unread."""
    if name not in DATASETS:
        _local_text(name)


def _local_text(name: str) -> str:
    """The text of a local dataset file; a missing, unreadable, non-UTF-8 or empty one is one line naming it."""
    path = Path(name)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        exists = is_file = False
    if not is_file:
        if exists:
            raise CompressError(f"dataset {name!r} is a directory, not a text file; pass the path of a UTF-8 "
                                "text file")
        if path.suffix or "/" in name or "\\" in name:
            raise CompressError(f"dataset file {name} does not exist; check the path, or use one of "
                                f"{', '.join(DATASETS)}")
        raise CompressError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a path to a text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompressError(f"dataset file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                            f"{e.start}); convert it to UTF-8 (e.g. iconv -t utf-8) or pick another file") from None
    except OSError as e:
        raise CompressError(f"dataset file {path} cannot be read ({e.strerror or e}); check its permissions") from None
    if not text.strip():
        raise CompressError(f"dataset file {path} is empty; pass a text file with enough text for the windows")
    return text
