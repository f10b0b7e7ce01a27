"""The fleet policy (`fleet.yaml`): its schema, a loader whose errors name file, field and line,
and the rule each device ends up with.

Precedence, field by field: device > groups (in file order, a later match overrides an earlier
one) > defaults > built-in values. Only keys an override sets replace; `constraints` and
`hysteresis` merge key by key, `battery_modes` is replaced as a whole. A key written as `null`
counts as not set (it inherits).
"""
from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Objective = Literal["max_accuracy", "min_latency", "min_energy"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^+#/\x00]+$")]


class PolicyError(ValueError):
    """A policy file that cannot be used; `problems` holds one (field, line, message) each."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, tuple(problems)
        lines = [f"{file}:{p.line or '?'}: {p.field + ': ' if p.field else ''}{p.message}"
                 for p in problems]
        head = f"{len(problems)} problems in policy {file}:\n" if len(problems) > 1 else ""
        super().__init__(head + "\n".join(lines))


@dataclass(frozen=True)
class Problem:
    field: str  # e.g. "defaults.constraints.latency_p95_ms" ("" for the whole file)
    line: int | None  # 1-based line in the YAML file
    message: str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constraints(_Strict):
    """Limits a device's model must respect; unset keys inherit."""

    latency_p95_ms: float | None = Field(None, gt=0, description="p95 latency budget on the device")
    min_accuracy: Fraction | None = Field(None, description="lowest acceptable accuracy, 0..1")
    max_mem_fraction: float | None = Field(None, gt=0.0, le=1.0,
                                           description="share of free memory a model may take")
    max_temp_c: float | None = Field(None, description="above it the device is 'hot'")


class BatteryMode(_Strict):
    """Applies when not charging and the battery is below `below` (0..1)."""

    below: float = Field(gt=0.0, le=1.0)
    objective: Objective | None = None
    min_accuracy: Fraction | None = None


class Hysteresis(_Strict):
    """Keep the running model unless it has run `min_dwell_s` and the best one gains `min_gain`
    (accuracy points for max_accuracy, relative cost for min_latency / min_energy)."""

    min_dwell_s: float | None = Field(None, ge=0)
    min_gain: float | None = Field(None, ge=0)


class Rule(_Strict):
    """Defaults, or an override in a group or for one device: every field optional."""

    objective: Objective | None = None
    constraints: Constraints | None = None
    battery_modes: list[BatteryMode] | None = None
    hysteresis: Hysteresis | None = None
    finetune_on_demand: bool | None = Field(
        None, description="deploy least-squares-only hybrids at once, fine-tune later")

    @field_validator("battery_modes")
    @classmethod
    def _distinct_thresholds(cls, modes: list[BatteryMode] | None) -> list[BatteryMode] | None:
        belows = [m.below for m in modes or []]
        if len(set(belows)) != len(belows):
            raise ValueError(f"two battery modes share a `below` threshold ({belows}); "
                             "give each mode its own threshold")
        return modes


class Match(_Strict):
    """A device matches when its class is listed (or no list is given) and it has every tag."""

    classes: list[str] | None = None
    tags: dict[str, str] = {}


class Group(Rule):
    name: Name
    match: Match = Match()


class Rollout(_Strict):
    waves: list[int] = Field([10, 50, 100], description="cumulative percent of the devices")
    wave_interval_s: float = Field(10.0, ge=0)
    max_failure_percent: float = Field(20.0, ge=0, le=100)
    # what released devices serve after their swap (fleet_controller.rollout.kpi_breach)
    kpi_window_s: float = Field(5.0, ge=0, description="watch each HEALTHY device this long "
                                "before the next wave")
    max_error_rate: Fraction = Field(0.05, description="failed share of served requests")
    max_accuracy_drop: Fraction = Field(0.15, description="probe accuracy under the catalog's "
                                        "test accuracy by more than this is a breach")

    @field_validator("waves")
    @classmethod
    def _waves(cls, waves: list[int]) -> list[int]:
        if not waves or waves[-1] != 100:
            raise ValueError(f"waves {waves} must end at 100 (percent of the fleet), "
                             "e.g. [10, 50, 100]")
        if any(not 0 < w <= 100 for w in waves):
            raise ValueError(f"waves {waves} must be percents in 1..100")
        if any(a >= b for a, b in zip(waves, waves[1:])):
            raise ValueError(f"waves {waves} must be strictly increasing, e.g. [10, 50, 100]")
        return waves


class FleetPolicy(_Strict):
    catalog: Path = Field(description="the stitch_lib catalog directory "
                                      "(relative to the policy file)")
    reconcile_interval_s: float = Field(5.0, gt=0)
    telemetry_timeout_s: float = Field(30.0, gt=0, description="silent longer = offline")
    defaults: Rule = Rule()
    groups: list[Group] = []
    devices: dict[Name, Rule] = {}
    rollout: Rollout = Rollout()

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[Group]) -> list[Group]:
        names = [g.name for g in groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"group names must be unique; {', '.join(map(repr, dup))} "
                             "appears more than once: rename or merge them")
        return groups


@dataclass(frozen=True)
class ResolvedRule:
    """The rule one device runs under, every field concrete (inf = no limit)."""

    objective: Objective = "max_accuracy"
    latency_p95_ms: float = math.inf
    min_accuracy: float = 0.0
    max_mem_fraction: float = 1.0
    max_temp_c: float = math.inf
    battery_modes: tuple[BatteryMode, ...] = ()  # sorted by `below`, lowest first
    min_dwell_s: float = 20.0
    min_gain: float = 0.005
    finetune_on_demand: bool = True
    sources: tuple[str, ...] = ()  # "defaults", "group:NAME", "device:ID" that applied


def matches(group: Group, device_class: str, tags: dict[str, str]) -> bool:
    m = group.match
    return ((m.classes is None or device_class in m.classes)
            and all(tags.get(k) == v for k, v in m.tags.items()))


def _apply(base: dict[str, Any], rule: Rule) -> None:
    """Overlay the keys `rule` sets onto the flat field dict `base`."""
    if rule.objective is not None:
        base["objective"] = rule.objective
    if rule.finetune_on_demand is not None:
        base["finetune_on_demand"] = rule.finetune_on_demand
    if rule.battery_modes is not None:
        base["battery_modes"] = tuple(sorted(rule.battery_modes, key=lambda m: m.below))
    for part in (rule.constraints, rule.hysteresis):
        if part is not None:
            base.update({k: v for k, v in part.model_dump().items() if v is not None})


def effective_rule(policy: FleetPolicy, device_id: str, device_class: str,
                   tags: dict[str, str]) -> ResolvedRule:
    """The merged rule for one device (device > groups in file order > defaults)."""
    fields: dict[str, Any] = {}
    sources = ["defaults"]
    _apply(fields, policy.defaults)
    for g in policy.groups:
        if matches(g, device_class, tags):
            _apply(fields, g)
            sources.append(f"group:{g.name}")
    if device_id in policy.devices:
        _apply(fields, policy.devices[device_id])
        sources.append(f"device:{device_id}")
    return ResolvedRule(**fields, sources=tuple(sources))


def policy_schema() -> dict[str, Any]:
    """JSON Schema of fleet.yaml, for editors (e.g. yaml-language-server)."""
    return FleetPolicy.model_json_schema()


# ---- loading, with errors that point at a line ------------------------------------------


def _strip(tp: Any) -> Any:
    """`X | None` → X, Annotated[X, ...] → X."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _type_at(loc: tuple[Any, ...]) -> Any:
    """The annotation of the field at `loc` in FleetPolicy (None when it cannot be followed)."""
    tp: Any = FleetPolicy
    for part in loc:
        tp = _strip(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict and isinstance(part, str):
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _strip(tp)


def _node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The value node at `loc`, or the deepest node on the way when `loc` leaves the file."""
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                return node
            node = hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _key_node(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """The key node of `loc` (for unknown or invalid keys)."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        return next((k for k, _ in parent.value if k.value == str(loc[-1])), parent)
    return parent


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """What was wrong and how to fix it."""
    kind, got = err["type"], err.get("input")
    name = loc[-1] if loc else "(top level)"
    if kind == "extra_forbidden":
        parent = _type_at(loc[:-1])
        allowed = list(parent.model_fields) if isinstance(parent, type) else []
        close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
        hint = f" — did you mean {close[0]!r}?" if close else "."
        return (f"unknown key {name!r}{hint} Allowed keys here: {', '.join(allowed)}"
                if allowed else f"unknown key {name!r}; remove it")
    if kind == "missing":
        return f"required key {name!r} is missing; add it"
    if kind == "literal_error":
        allowed = [str(a) for a in typing.get_args(_type_at(loc))]
        close = difflib.get_close_matches(str(got), allowed, n=1, cutoff=0.6)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        return f"{got!r} is not one of {', '.join(allowed)}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return msg
    if kind == "string_pattern_mismatch":
        return f"{got!r} cannot be a name or ID: it must be one MQTT topic level, without + # /"
    text = f"{msg} (got {got!r})"
    if kind == "string_type" and isinstance(got, (int, float, bool)):
        text += "; quote it to make it text, e.g. '" + str(got) + "'"
    elif kind == "less_than_equal" and err.get("ctx", {}).get("le") == 1:
        text += "; fractions are written 0..1, e.g. 0.15 for 15%"
    return text


def _duplicate_keys(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> list[Problem]:
    """YAML silently keeps the last of repeated keys; report them instead."""
    out: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            if k.value in seen:
                out.append(Problem(_field(path + (k.value,)), k.start_mark.line + 1,
                                   f"key {k.value!r} appears twice in this mapping; keep one"))
            seen.add(k.value)
            out += _duplicate_keys(v, path + (k.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out += _duplicate_keys(v, path + (i,))
    return out


def parse_policy(text: str, file: str = "<policy>") -> FleetPolicy:
    """Validate policy YAML text; PolicyError naming file, field and line otherwise."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # syntax errors carry marks; reader errors (bad bytes) not
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        what = " ".join(filter(None, [getattr(exc, "context", None),
                                      getattr(exc, "problem", None)])) or str(exc)
        line = (mark.line + 1 if mark else
                text.count("\n", 0, getattr(exc, "position", 0)) + 1)  # a ReaderError's
        raise PolicyError(file, [Problem("", line,
                                         f"YAML syntax error: {what}; check the indentation, "
                                         "and quote values that contain ':' or '#'")]) from None
    except RecursionError:
        raise PolicyError(file, [Problem("", 1, "YAML nested too deeply; a policy is a few "
                                                "levels of mappings")]) from None
    if not isinstance(data, dict):
        raise PolicyError(file, [Problem("", 1, "a policy is a mapping with at least "
                                                "`catalog: <dir>`; see fleet.yaml")])
    dups = _duplicate_keys(root)
    if dups:
        raise PolicyError(file, dups)
    try:
        return FleetPolicy.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            extra = err["type"] == "extra_forbidden"  # its last part is the user's own key
            loc = err["loc"] if extra else tuple(p for p in err["loc"] if p != "[key]")
            key_error = extra or "[key]" in err["loc"]
            node = _key_node(root, loc) if key_error and loc else _node_at(root, loc)
            line = node.start_mark.line + 1 if node is not None else None
            problems.append(Problem(_field(loc), line, _describe(err, loc)))
        raise PolicyError(file, problems) from None


def load_policy(path: str | Path) -> FleetPolicy:
    """Read and validate a fleet.yaml; `catalog` comes back absolute and normalised (a relative
    one is taken from the policy file's folder)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(str(path), [Problem("", None, f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [Problem("", raw.count(b"\n", 0, exc.start) + 1,
                                              f"not UTF-8 text: {exc.reason} at byte "
                                              f"{exc.start}")]) from None
    policy = parse_policy(text, str(path))
    return policy.model_copy(update={"catalog": Path(os.path.normpath(
        path.absolute().parent / policy.catalog))})
