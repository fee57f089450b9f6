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
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from compress.errors import CompressError
from compress.plan import LayerSpec


@dataclass(frozen=True)
class Calibrate:
    dataset: str = "pydoc"  # pydoc | wikitext2 | c4 | ptb | random | path to a text file
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # windows per forward pass of a block
    true_sequential: bool = False  # GPTQ --true-sequential: re-collect H after each group of Linears


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


@dataclass(frozen=True)
class Override:
    match: str  # fnmatch glob on the module name, e.g. "*.mlp.down_proj"
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    binary: bool | None = None
    salient: float | None = None
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
                break
        return LayerSpec(**spec)

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
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- strict construction ------------------------------------------------------------------------


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
    """Apply one `a.b.c=value` edit (value parsed as YAML) to the raw recipe mapping, in place."""
    if "=" not in assignment:
        raise CompressError(f"--set {assignment!r} must look like key.path=value (e.g. round.damp=0.02)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = data
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise CompressError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an index of the list")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
            if not isinstance(node, dict | list):
                raise CompressError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def available() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def _recipe_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent / "recipes"
    return repo if repo.is_dir() else Path(str(resources.files("compress.recipes")))


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe by name (recipes/NAME.yaml) or path, apply --set edits, validate strictly."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = _recipe_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise CompressError(f"unknown recipe {name_or_path!r}; available: {', '.join(available())} "
                                "(or pass a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CompressError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    for s in overrides:
        apply_set(data, s)
    return from_dict(data)
