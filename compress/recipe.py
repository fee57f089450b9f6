"""Recipes: named YAML files in recipes/ that say how to compress, loaded strictly.

    name: gptq-4bit
    description: GPTQ, 4-bit asymmetric, groups of 128 along in_features.
    calibrate: {dataset: pydoc, samples: 128, seqlen: 512, seed: 0, batch_size: 8, true_sequential: false}
    weights:   {bits: 4, group_size: 128, symmetric: false, scale_dtype: float16}   # default LayerSpec
    round:     {method: gptq, damp: 0.01, block_size: 128, act_order: false}     # method + its Config
    overrides:                                                                    # first match wins
      - {match: "*.mlp.down_proj", bits: 8}
      - {match: "model.layers.0.*", skip: true}                                   # stays dense

Every mapping becomes a frozen dataclass; an unknown key or a value of the wrong type is a
`CompressError` that names it and lists what is valid. `--set round.damp=0.02` edits the raw mapping
(values parsed as YAML) before validation. The resolved recipe (defaults filled in) is written next to
every checkpoint.

YAML is read with `RecipeLoader`, not PyYAML's 1.1 defaults: `2:4` stays a string (1.1 reads it as the
base-60 number 124), a duplicate key is an error (1.1 silently keeps the last), and `1e-4` is a float.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from compress.errors import CompressError
from compress.plan import LayerSpec


def ggml_spec(t: str) -> LayerSpec:
    """The LayerSpec of a Linear stored as ggml block type t (the type fixes its width and sub-block)."""
    from compress import ggml
    from compress.codecs import ggml as codec

    if t not in ggml.TYPES:
        raise CompressError(f"ggml type {t!r} is not supported; choose one of {', '.join(ggml.TYPES)}")
    return LayerSpec(bits=codec.code_bits(t), group_size=ggml.TYPES[t].sub, ggml=t)


@dataclass(frozen=True)
class Calibrate:
    dataset: str = "pydoc"  # pydoc | wikitext2 | c4 | ptb | random | path to a text file
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # windows per forward pass of a block
    true_sequential: bool = False  # GPTQ --true-sequential: re-collect H after each group of Linears
    max_memory: float = 0.0  # GB of calibration hidden states kept in memory, the rest spilled to disk (0: no limit)

    def __post_init__(self) -> None:
        require("calibrate", self, positive=("samples", "seqlen", "batch_size"), non_negative=("seed", "max_memory"))


@dataclass(frozen=True)
class Rotate:
    """Orthogonal rotations fused into the weights before anything else (compress/rotate.py)."""

    method: str = "none"  # none | hadamard (randomised Hadamard) | random (Haar orthogonal)
    seed: int = 0
    r1: bool = True  # the residual stream (embedding, every Linear that reads or writes it, lm_head)
    r2: bool = True  # each attention head's values (v_proj rows, o_proj columns)

    def __post_init__(self) -> None:
        if self.method not in ROTATIONS:
            raise CompressError(f"recipe value rotate.method={self.method!r} is invalid; choose one of "
                                f"{', '.join(ROTATIONS)}")


ROTATIONS = ("none", "hadamard", "random")


@dataclass(frozen=True)
class Reconstruct:
    """Block-wise training of each rounded block toward the dense block's outputs (compress/reconstruct.py)."""

    epochs: int = 0  # passes over the windows per block; 0 = no reconstruction
    samples: int = 0  # train on the first this many calibration windows (0: all of them)
    batch_size: int = 1  # windows per optimiser step
    lr: float = 2e-2  # AdamW rate of the latent weights, in grid steps (cosine decay to 0 over each block's steps)
    scale_lr: float = 1e-3  # ... and of the group scales, relative to the rounding's scales
    seed: int = 0  # the order of the windows
    # mse: the mean squared error of the block's outputs (EfficientQAT's); token: each token's squared error over
    # its target's squared norm, averaged over tokens (what the next RMSNorm sees: a pre-norm model reads every
    # token's hidden state divided by its norm, and the attention sink's hidden state, 85-98 % of the squared
    # norm in SmolLM2's middle blocks, would otherwise be nearly all the loss). Measured on SmolLM2 at w2g64 with
    # rotation, GPTAQ and clipping (evals/rotate.py): token 47.1 ppl, mse 42.4.
    loss: str = "mse"

    def __post_init__(self) -> None:
        require("reconstruct", self, positive=("lr", "scale_lr", "batch_size"),
                non_negative=("epochs", "samples", "seed"))
        if self.loss not in ("mse", "token"):
            raise CompressError(f"reconstruct loss={self.loss!r} is invalid; choose mse or token")


@dataclass(frozen=True)
class Weights:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: str = "float16"
    binary: bool = False  # PB-LLM: mu + alpha * sign (bits must be 1), rounded by round.method=pbllm
    salient: float = 0.0  # binary layers: fraction of weights kept at 8 bits
    sparsity: float = 0.0  # prune this fraction of every row before rounding (stored compactly)
    pattern: str = "unstructured"  # or n:m, e.g. 2:4
    prune: str = "magnitude"  # magnitude | wanda | obs (SparseGPT's score; GPTQ compensates either way)
    ggml: str = ""  # store in this ggml block type (q4_k, q6_k, q8_0, ...): its grid replaces bits/group_size/...
    # also round the output head (the Linear named "lm_head", spec after overrides) after the last block, on its
    # own inputs: for untied heads (a rotated model's, or a model whose embeddings are not tied)
    lm_head: bool = False


@dataclass(frozen=True)
class Override:
    match: str  # fnmatch glob on the module name, e.g. "*.mlp.down_proj"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    binary: bool | None = None
    salient: float | None = None
    ggml: str | None = None  # a ggml block type for the matched Linears
    skip: bool = False  # keep this Linear dense


@dataclass(frozen=True)
class Round:
    method: str = "gptq"
    config: Any = None  # the method's Config instance (compress.round.METHODS[method].Config)


@dataclass(frozen=True)
class Allocate:
    method: str = "uniform"
    config: Any = None  # the allocator's Config instance (compress.allocate.METHODS[method].Config)


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    calibrate: Calibrate = field(default_factory=Calibrate)
    rotate: Rotate = field(default_factory=Rotate)
    reconstruct: Reconstruct = field(default_factory=Reconstruct)
    allocate: Allocate = field(default_factory=Allocate)
    weights: Weights = field(default_factory=Weights)
    round: Round = field(default_factory=Round)
    distill: Any = None  # compress.distill.Config (steps: 0 = no distillation stage), set by from_dict
    overrides: tuple[Override, ...] = ()
    serves: tuple[str, ...] = ()  # export formats the recipe is made for: checked on the model before calibrating

    def pinned(self, name: str) -> bool:
        """Does an override fix this Linear's bits (so that allocators must leave it alone)?"""
        import fnmatch

        o = next((o for o in self.overrides if fnmatch.fnmatchcase(name, o.match)), None)
        return o is not None and o.bits is not None

    def layer_spec(self, name: str) -> LayerSpec | None:
        """The LayerSpec for module `name` (None = keep dense), after the first matching override."""
        import fnmatch

        w = self.weights
        spec = dict(bits=w.bits, group_size=w.group_size, symmetric=w.symmetric, scale_dtype=w.scale_dtype,
                    binary=w.binary, salient=w.salient, sparsity=w.sparsity,
                    pattern=w.pattern, prune=w.prune)
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.match):
                if o.skip:
                    return None
                spec.update({k: v for k, v in (("bits", o.bits), ("group_size", o.group_size),
                                                ("symmetric", o.symmetric), ("binary", o.binary),
                                                ("salient", o.salient)) if v is not None})
                if o.binary is False:  # quantized, not binarized: no salient part either
                    spec["salient"] = 0.0
                if o.ggml is not None:
                    return ggml_spec(o.ggml) if o.ggml else LayerSpec(**spec)
                break
        return ggml_spec(w.ggml) if w.ggml else LayerSpec(**spec)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for section in ("allocate", "round"):
            choice = getattr(self, section)
            cfg = dataclasses.asdict(choice.config)
            d[section] = {"method": choice.method, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in cfg.items()}}
        d["overrides"] = [{k: v for k, v in o.items() if v is not None} for o in d["overrides"]]
        return d

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=RecipeDumper, sort_keys=False)


# --- reading YAML -------------------------------------------------------------------------------

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.1's int and float patterns less their base-60 forms (`2:4` -> 124, `1:30.5` -> 90.5) and their
# leading-zero octal (`010` -> 8, a string now and so a type error); `1e-4` (no dot) is a float, as in YAML 1.2.
_NUMBERS = {
    _INT: re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)$"),
    _FLOAT: re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                          |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?\.(?:inf|Inf|INF)
                          |\.(?:nan|NaN|NAN))$""", re.X),
}


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the two YAML 1.1 habits that silently change a recipe turned off: base-60
    numbers (a `pattern: 2:4` would become 124) and duplicate keys (the last one would win unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may legitimately repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark,
                    note=f"first on line {first}; YAML would keep only the last value, so remove one of them")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, _NUMBERS.get(tag, rx)) for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}



class RecipeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that also quotes the strings RecipeLoader reads as numbers (`'1e-4'`), so a saved
    recipe reads back the same with RecipeLoader and with plain `yaml.safe_load` (which quotes `'2:4'`)."""


RecipeDumper.yaml_implicit_resolvers = {
    first: [*resolvers, *((tag, rx) for tag, rx in RecipeLoader.yaml_implicit_resolvers.get(first, ())
                          if tag in _NUMBERS)]
    for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()}


def parse_yaml(text: str, what: str) -> Any:
    """`text` read with RecipeLoader; any YAML problem is one CompressError line naming `what` (the file or
    the --set edit), the line and column, and the fix."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: plain values only, never Python objects
    except yaml.YAMLError as e:
        raise CompressError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem, where, and for a `!!python/...` tag the fix."""
    if not isinstance(e, yaml.MarkedYAMLError) or not e.problem:
        return " ".join(str(e).split())
    text = " ".join(e.problem.split())
    mark = e.problem_mark
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    if "constructor for the tag" in text:
        return text + "; recipes hold plain values (numbers, strings, lists, mappings): remove the tag"
    return text + (f" ({e.note})" if e.note else "")


# --- strict construction ------------------------------------------------------------------------


def require(section: str, cfg: Any, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
            fraction: Iterable[str] = ()) -> None:
    """Refuse a section whose counts, sizes or fractions are out of range, naming the first bad key and its
    value: a zero sample count or a zero `save_every` would otherwise surface much later as an empty tensor or
    a ZeroDivisionError deep inside a stage (`fraction`: within [0, 1])."""
    rules = ((positive, "> 0", lambda v: v > 0), (non_negative, ">= 0", lambda v: v >= 0),
             (fraction, "within [0, 1]", lambda v: 0 <= v <= 1))
    for names, rule, ok in rules:
        for name in names:
            value = getattr(cfg, name)
            if not ok(value):
                raise CompressError(f"recipe value {section}.{name}={value!r} is out of range; it must be {rule}")


def _check_type(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CompressError(f"recipe value {path} must be a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise CompressError(f"recipe value {path} must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_check_type(v, item, f"{path}.{i}") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise CompressError(f"recipe value {path}={value!r} is not a finite number")
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise CompressError(f"recipe value {path}={value!r} is not a valid {name}")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{path}." if path else ""
        raise CompressError(f"unknown recipe key {where}{unknown[0]}; valid keys{' in ' + path if path else ''}: "
                            f"{', '.join(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise CompressError(f"recipe section {path or 'top level'}: {e}") from e


def _build_choice(section: str, data: Any, registry: dict, default: str) -> tuple[str, Any]:
    """A `{method: NAME, **options}` section -> (NAME, registry[NAME].Config(**options)), strictly."""
    if not isinstance(data, dict):
        raise CompressError(f"recipe value {section} must be a mapping, got {data!r}")
    data = dict(data)
    method = data.pop("method", default)
    if method not in registry:
        raise CompressError(f"unknown method {section}.method={method!r}; valid: {', '.join(registry)}")
    return method, _build(registry[method].Config, data, section)


def from_dict(data: dict[str, Any]) -> Recipe:
    """Validate a raw mapping into a Recipe (raises CompressError naming the first bad key/value)."""
    if not isinstance(data, dict):
        raise CompressError("a recipe must be a YAML mapping at the top level")
    # The methods' own registries and Configs validate their sections (imported here, not at the top, so
    # that core modules and a checkpoint load never import method code).
    from compress.allocate import METHODS as ALLOCATORS
    from compress.distill import Config as DistillConfig
    from compress.round import METHODS as ROUNDERS

    data = dict(data)
    rnd = Round(*_build_choice("round", data.pop("round", {}), ROUNDERS, "gptq"))
    distill_data = data.pop("distill", {})
    if not isinstance(distill_data, dict):
        raise CompressError(f"recipe value distill must be a mapping, got {distill_data!r}")
    distill = _build(DistillConfig, distill_data, "distill")
    alloc = Allocate(*_build_choice("allocate", data.pop("allocate", {}), ALLOCATORS, "uniform"))
    recipe = _build(Recipe, data, "")
    recipe = dataclasses.replace(recipe, round=rnd, allocate=alloc, distill=distill)
    for o in recipe.overrides:  # validate override values through LayerSpec's own checks
        if not o.skip:
            recipe.layer_spec(o.match)
    recipe.layer_spec("*")
    return recipe


def apply_set(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` edit (value parsed as YAML, as a recipe file is) to the raw recipe mapping, in
    place. The path walks sections (mappings, created when missing) and existing list indices only, so a
    typo is refused naming the edit rather than growing a stray key or indexing past a list."""
    if "=" not in assignment:
        raise CompressError(f"--set {assignment!r} must look like key.path=value (e.g. round.damp=0.02)")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise CompressError(f"--set {assignment!r}: the key {key!r} has an empty part; write key.path=value "
                            "(e.g. round.damp=0.02)")
    node: Any = data
    for i in range(len(parts) - 1):
        node = _step(node, parts, i, key)
    value = parse_yaml(raw, f"--set {key}: the value {raw!r}")
    if isinstance(node, list):
        node[_index(node, parts, len(parts) - 1, key)] = value
    else:
        node[parts[-1]] = value


def _step(node: dict[str, Any] | list[Any], parts: list[str], i: int, key: str) -> dict[str, Any] | list[Any]:
    """The section or list that `parts[i]` names inside `node` (a missing or empty section becomes {})."""
    if isinstance(node, list):
        child = node[_index(node, parts, i, key)]
    else:
        if node.get(parts[i]) is None:
            node[parts[i]] = {}
        child = node[parts[i]]
    if not isinstance(child, dict | list):
        raise CompressError(f"--set {key}: {'.'.join(parts[: i + 1])} holds the value {child!r}, not a section, "
                            f"so it has no {parts[i + 1]!r}; set {'.'.join(parts[: i + 1])}=... instead")
    return child


def _index(node: list[Any], parts: list[str], i: int, key: str) -> int:
    """`parts[i]` as an existing index of the list `node`, or a CompressError naming the list and its size."""
    p = parts[i]
    if p.isascii() and p.isdigit() and int(p) < len(node):
        return int(p)
    where = ".".join(parts[:i])
    valid = f"0..{len(node) - 1}" if node else "none: it is empty"
    raise CompressError(f"--set {key}: {where} is a list of {len(node)}, and {p!r} is not one of its indices "
                        f"({valid}); replace the whole list with {where}=[...]")


def available() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def _recipe_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent / "recipes"
    return repo if repo.is_dir() else Path(str(resources.files("compress.recipes")))


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe by name (recipes/NAME.yaml) or path, apply --set edits, validate strictly."""
    path = _find(name_or_path)
    data = read(path)
    for s in overrides:
        apply_set(data, s)
    return from_dict(data)


def _find(name_or_path: str) -> Path:
    """The recipe file: a .yaml/.yml path, else recipes/NAME.yaml; either missing is one line saying which."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or "\\" in name_or_path:
        if _is_file(path):
            return path
        raise CompressError(f"recipe file {name_or_path} does not exist (or is not a file); pass an existing "
                            f".yaml file or a named recipe: {', '.join(available())}")
    named = _recipe_dir() / f"{name_or_path}.yaml"
    if not _is_file(named):
        raise CompressError(f"unknown recipe {name_or_path!r}; available: {', '.join(available())} "
                            "(or pass a path to a .yaml file)")
    return named


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or one with a NUL byte
        return False


def read(path: Path) -> dict[str, Any]:
    """The raw mapping of a recipe file. An empty or comment-only file is refused: it would otherwise become
    the default recipe without a word, which is never what its author meant."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CompressError(f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                            "save it as UTF-8") from None
    except OSError as e:
        raise CompressError(f"recipe {path} cannot be read ({e.strerror or e}); check its permissions") from None
    data = parse_yaml(text, f"recipe {path}")
    if data is None:
        raise CompressError(f"recipe {path} is empty (or only comments), which would silently mean the defaults; "
                            "write the sections to use, e.g. `round: {method: gptq}`, or pass a named recipe")
    if not isinstance(data, dict):
        raise CompressError(f"recipe {path} must be a YAML mapping of sections (name:, calibrate:, weights:, "
                            f"round:, ...) at the top level, not a {type(data).__name__}")
    return data
