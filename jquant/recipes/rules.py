"""Declarative quantization recipes: ordered rules matched against quantization-site paths.

A *site* is a weight the model family declares quantizable (a linear kernel,
a stacked expert tensor, an element-wise weight...), named by its module path
joined with ``/`` (``layers/3/self_attn/q_proj``). A ``Recipe`` is an ordered
tuple of ``Rule`` s; each site takes the **first** rule whose ``pattern`` fully
matches its path. Sites matched by ``keep_float`` (embeddings and the output
head by default) stay in floating point unless the recipe empties that tuple.
Rules that match no site are reported (``unused_rules``) so typos surface.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from jquant.algorithms.weights import algorithm_names
from jquant.transforms.registry import transform_kinds

DEFAULT_KEEP_FLOAT: tuple[str, ...] = (r"(.*/)?embed_tokens", r"(.*/)?lm_head")


def _freeze(options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    if options is None:
        return ()
    items = options.items() if isinstance(options, Mapping) else options
    return tuple(sorted((str(k), v) for k, v in items))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Sites whose path fully matches ``pattern`` get ``weight``/``activation`` formats via ``algorithm``.

    ``weight`` and ``activation`` are format names of ``jquant.formats``
    (``None`` keeps that tensor in floating point); ``weight_options`` /
    ``activation_options`` override fields of the named format (e.g.
    ``{"symmetric": False}``); ``options`` go to the algorithm (GPTQ:
    ``damp``, ``act_order``, ``block_size``, ``static_groups``; GPTVQ: ``GPTVQConfig``
    fields; PCDVQ: ``PCDVQConfig`` fields; RWKVQuant: those of the branch its format selects,
    or ``MixConfig`` fields for element-wise vectors).
    ``static_activation`` calibrates one activation scale per site (from the
    largest input magnitude seen in calibration) instead of computing scales
    per token at run time; it needs a per-tensor symmetric integer format
    such as ``"int8-tensor"``; at a site that receives group ids (``jquant.sites.ActivationGroups``:
    an MLLM's modalities, a diffusion model's timestep buckets) it calibrates one scale per group;
    ``static_activation="shared"`` calibrates one scale over all groups' tokens there instead (the single
    shared static scale baseline of MQuant's Table 7).

    ``when`` (group names) conditions the rule on groups: it then applies only to the inputs of those
    groups and may set only activation fields (a weight is shared by every group). For each group, a
    site takes the first rule that matches its path and either has no ``when`` or names the group.
    GPTQ's ``options={"group_weighting": "balanced"}`` weighs each group's Hessian equally
    (``Σ_g H_g / n_g``) instead of by token count (``"tokens"``, the default).
    """

    pattern: str
    weight: str | None = None
    activation: str | None = None
    algorithm: str = "rtn"
    weight_options: tuple[tuple[str, Any], ...] = ()
    activation_options: tuple[tuple[str, Any], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    static_activation: bool | str = False
    when: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule.pattern must be a regular expression string matched against site paths "
                             f"(e.g. r'.*mlp.*'), got {type(self.pattern).__name__} {self.pattern!r}.")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regular expression: {err}.") from None
        if self.algorithm not in algorithm_names():
            raise ValueError(f"Rule({self.pattern!r}).algorithm must be one of {algorithm_names()} (registered weight "
                             f"algorithms), got {self.algorithm!r}.")
        if self.algorithm != "rtn" and self.weight is None:
            raise ValueError(f"Rule({self.pattern!r}): algorithm {self.algorithm!r} needs a weight format.")
        if self.static_activation not in (False, True, "shared"):
            raise ValueError(f"Rule({self.pattern!r}).static_activation must be False, True (one scale per site, per "
                             f"group where groups arrive) or 'shared' (one scale over all groups), got "
                             f"{self.static_activation!r}.")
        if self.static_activation and self.activation is None:
            raise ValueError(f"Rule({self.pattern!r}): static_activation needs an activation format (e.g. 'int8-tensor').")
        for name in ("weight_options", "activation_options", "options"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        object.__setattr__(self, "when", (self.when,) if isinstance(self.when, str) else tuple(self.when))
        if self.when and (self.weight is not None or self.algorithm != "rtn" or self.weight_options or self.options):
            raise ValueError(f"Rule({self.pattern!r}, when={list(self.when)}): a rule conditioned on groups sets only "
                             "activation formats (the weight is shared by all groups); move the weight to a rule "
                             "without when=.")
        weighting = dict(self.options).get("group_weighting", "tokens")
        if weighting not in ("tokens", "balanced"):
            raise ValueError(f"Rule({self.pattern!r}): option group_weighting={weighting!r} must be 'tokens' or "
                             "'balanced'.")

    def matches(self, path: str, group: str | None = None) -> bool:
        """Whether the rule applies to site ``path`` (for the inputs of ``group``, when given)."""
        if self.when and group not in self.when:
            return False
        return re.fullmatch(self.pattern, path) is not None

    def to_dict(self) -> dict:
        out = {"pattern": self.pattern, "weight": self.weight, "activation": self.activation, "algorithm": self.algorithm}
        for name in ("weight_options", "activation_options", "options"):
            if getattr(self, name):
                out[name] = dict(getattr(self, name))
        if self.static_activation:
            out["static_activation"] = self.static_activation
        if self.when:
            out["when"] = list(self.when)
        return out


@dataclasses.dataclass(frozen=True)
class TransformStep:
    """An equivalence transform run before the rules: ``kind`` in ``transform_kinds()`` with its ``options``.

    ``smoothquant``: ``alpha`` (0.5). ``quarot``: ``online`` (``["down", "qk"]``),
    ``rotation`` (``"hadamard"``), ``pad``, ``seed``. ``ostquant``: fields of
    ``jquant.transforms.OSTQuantConfig`` (``steps``, ``batch_size``, ``init``, ``online``, ...)
    and ``seed``; its training quantizers follow the recipe's formats. ``mambaquant`` (Mamba
    families): ``alpha`` (0.5), ``klt``, ``smooth``, ``rotate``, ``online`` (all True: the full
    method; switching parts off gives its ablations), ``seed``.
    """

    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in transform_kinds():
            raise ValueError(f"TransformStep.kind must be one of {transform_kinds()} (registered transforms), got "
                             f"{self.kind!r}.")
        object.__setattr__(self, "options", _freeze({k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in dict(_freeze(self.options)).items()}))

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformStep:
        data = dict(data)
        if "kind" not in data:
            raise ValueError(f"recipe transform {data} needs a 'kind' ({', '.join(transform_kinds())}).")
        kind = data.pop("kind")
        return cls(kind=kind, options=data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered set of rules; see the module docstring for the matching semantics.

    ``transforms`` run in order on the float model before any rule (equivalence
    transforms: SmoothQuant, QuaRot, OSTQuant); ``kv_cache`` names the format that
    keys and values are quantized with, per token and head (``"int4-asym"``: KV4), for every
    attention layer, or gives ``(pattern, format)`` pairs over attention-layer paths (first match
    wins; format None keeps that layer's cache in floating point; ``kv_format_for``). ``ssm_matmul`` names the
    format both operands of every Mamba-1 SSM matmul (the state ``h`` and ``C``, MambaQuant's site a4) are
    quantized with, per token (``ops.ssm_matmul``).
    """

    name: str
    rules: tuple[Rule, ...]
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    description: str = ""
    transforms: tuple[TransformStep, ...] = ()
    kv_cache: str | tuple[tuple[str, str | None], ...] | None = None
    ssm_matmul: str | None = None

    def __post_init__(self):
        if self.ssm_matmul is not None and not isinstance(self.ssm_matmul, str):
            raise ValueError(f"Recipe {self.name!r}: ssm_matmul must be a format name or None, got {self.ssm_matmul!r}.")
        if self.kv_cache is not None and not isinstance(self.kv_cache, str):
            pairs = tuple(tuple(p) for p in self.kv_cache)
            for pair in pairs:
                if len(pair) != 2 or not isinstance(pair[0], str) or not (pair[1] is None or isinstance(pair[1], str)):
                    raise ValueError(f"Recipe {self.name!r}: kv_cache entries are (layer pattern, format name or None) "
                                     f"pairs, got {pair!r}.")
                try:
                    re.compile(pair[0])
                except re.error as err:
                    raise ValueError(f"Recipe {self.name!r}: kv_cache pattern {pair[0]!r} is invalid: {err}.") from None
            object.__setattr__(self, "kv_cache", pairs)
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        object.__setattr__(self, "transforms", tuple(
            t if isinstance(t, TransformStep) else TransformStep.from_dict(t) for t in self.transforms))
        if not self.rules:
            raise ValueError(f"Recipe {self.name!r} has no rules; add at least one Rule.")
        kinds = [t.kind for t in self.transforms]
        if kinds.count("quarot") + kinds.count("ostquant") > 1:
            raise ValueError(f"Recipe {self.name!r}: at most one rotation step (quarot or ostquant), got {kinds}.")
        for pattern in self.keep_float:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"Recipe {self.name!r}: keep_float pattern {pattern!r} is invalid: {err}.") from None

    def kv_format_for(self, layer: str) -> str | None:
        """The KV-cache format of attention layer ``layer`` (its module path), or None (float cache)."""
        if self.kv_cache is None or isinstance(self.kv_cache, str):
            return self.kv_cache
        return next((fmt for pattern, fmt in self.kv_cache if re.fullmatch(pattern, layer)), None)

    def rule_for(self, path: str, expert: int | None = None, group: str | None = None) -> Rule | None:
        """The rule that applies to site ``path`` (None: stays in floating point).

        For expert ``e`` of a stacked expert site, a rule (or ``keep_float`` pattern) applies if it matches
        the site path or the expert's path ``{path}/{e}``, so ``.*/experts/down_proj/[0-3]`` targets experts 0-3.
        With ``group`` (a group name), rules conditioned on that group (``when=``) take part too.
        """
        names = (path,) if expert is None else (path, f"{path}/{expert}")
        if any(re.fullmatch(p, n) for p in self.keep_float for n in names):
            return None
        return next((r for r in self.rules if any(r.matches(n, group) for n in names)), None)

    def assign(self, paths: Iterable[str]) -> dict[str, Rule | None]:
        """Rule (or None) per site path, in the given order."""
        return {p: self.rule_for(p) for p in paths}

    def unused_rules(self, paths: Iterable[str], experts: Mapping[str, int] | None = None,
                     groups: Mapping[str, tuple[str, ...]] | None = None) -> list[Rule]:
        """Rules that no site takes (typos, or sites shadowed by an earlier rule); ``experts`` gives the number of
        experts of each stacked expert site, whose experts take rules one by one; ``groups`` the group names
        of each site that receives group ids, whose groups take rules one by one."""
        experts, groups = experts or {}, groups or {}
        used = {id(self.rule_for(p, e)) for p in paths for e in (range(experts[p]) if p in experts else (None,))}
        used |= {id(self.rule_for(p, group=g)) for p, names in groups.items() for g in names}
        return [r for r in self.rules if id(r) not in used]

    @property
    def online_rotations(self) -> tuple[str, ...]:
        """The run-time Hadamards the recipe's rotation step switches on (``"down"``, ``"qk"``)."""
        for t in self.transforms:
            if t.kind in ("quarot", "ostquant"):
                default = ("down", "qk") if t.kind == "quarot" else ("down",)
                return tuple(dict(t.options).get("online", default))
        return ()

    @property
    def pad(self) -> bool:
        """Whether online rotations may zero-pad widths with no Hadamard construction."""
        return any(bool(dict(t.options).get("pad", False)) for t in self.transforms)

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "keep_float": list(self.keep_float),
               "rules": [r.to_dict() for r in self.rules]}
        if self.transforms:
            out["transforms"] = [t.to_dict() for t in self.transforms]
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache if isinstance(self.kv_cache, str) else [list(p) for p in self.kv_cache]
        if self.ssm_matmul is not None:
            out["ssm_matmul"] = self.ssm_matmul
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        unknown = set(data) - {"name", "description", "keep_float", "rules", "transforms", "kv_cache", "ssm_matmul"}
        if unknown:
            raise ValueError(f"recipe has unknown keys {sorted(unknown)}; allowed: name, description, keep_float, rules, "
                             "transforms, kv_cache, ssm_matmul.")
        if "rules" not in data:
            raise ValueError("recipe needs a 'rules' list.")
        rules = []
        for i, r in enumerate(data["rules"]):
            fields = {f.name for f in dataclasses.fields(Rule)}
            bad = set(r) - fields
            if bad:
                raise ValueError(f"recipe rule #{i} has unknown keys {sorted(bad)}; allowed: {sorted(fields)}.")
            rules.append(Rule(**r))
        kw = {"keep_float": tuple(data["keep_float"])} if "keep_float" in data else {}
        kw["transforms"] = tuple(TransformStep.from_dict(t) for t in data.get("transforms", ()))
        kw["kv_cache"] = data.get("kv_cache")
        kw["ssm_matmul"] = data.get("ssm_matmul")
        return cls(name=data.get("name", "custom"), rules=tuple(rules), description=data.get("description", ""), **kw)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Load a recipe from a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"recipe file {path} is not valid YAML ({err}); fix the file or use a built-in "
                                 "recipe (`jquant list recipes`).") from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"recipe file {path} is not valid JSON ({err}); fix the file or use a built-in "
                                 "recipe (`jquant list recipes`).") from None
        else:
            raise ValueError(f"recipe file {path}: use a .json, .yaml or .yml file.")
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {path} must hold a mapping of recipe fields (name, rules, ...), "
                             f"got {type(data).__name__}.")
        data = dict(data)
        data.setdefault("name", path.stem)
        return cls.from_dict(data)
