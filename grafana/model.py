"""Checks a dashboard JSON against Grafana's dashboard model, and lists and
fills in the PromQL of its panels for the tests and the renderer.

The model is the one Grafana's foundation SDK generates from Grafana's own
schema (the CUE kinds behind the dashboard JSON). A dashboard is valid when
1. the SDK decodes it (``Dashboard.from_json``) and re-encodes it to the very
   same JSON: a key the model does not know, or one in the wrong place, is
   dropped on the way and shows up as a difference;
2. every decoded value has the type the model declares (the SDK decodes
   without checking: ``"h": "8"`` or ``"type": "sometype"`` for a variable
   would otherwise pass), enums included;
3. sockwatch's own rules hold: each panel says what it shows in a description,
   and what a bad value looks like ("Bad: ..."), queries the ``$datasource`` variable, and every variable a query uses is
   defined (``datasource`` of type datasource and ``instance`` always).
"""

from __future__ import annotations

import enum
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

register_default_plugins()  # panel options and Prometheus queries decode to typed models

# Variables Grafana itself provides.
BUILTIN = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
           "__range_ms", "__dashboard", "__from", "__to"}
VAR_RE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Where two JSON values differ (``a`` the original, ``b`` the round trip)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if k not in b:
                yield f"{path}/{k}: not in the dashboard model"
            elif k not in a:
                yield f"{path}/{k}: added by the model ({b[k]!r})"
            else:
                yield from diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}/{i}")
    elif a != b or type(a) is not type(b):
        yield f"{path}: {a!r} becomes {b!r}"


def _fits(value: Any, hint: Any) -> bool:
    """Whether a decoded value matches a type annotation of the SDK's models."""
    if hint in (Any, object) or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a construct the models do not use: do not guess


def _model_class(hint: Any) -> type | None:
    """The SDK model class behind ``Optional[Model]``, ``list[Model]`` and the like."""
    if isinstance(hint, type) and hasattr(hint, "from_json"):
        return hint
    for arg in typing.get_args(hint):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _raw(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, dict) for v in items)


def type_errors(obj: Any, path: str = "") -> Iterator[str]:
    """Every attribute of a decoded model tree whose value its class does not allow."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from type_errors(item, f"{path}/{i}")
        return
    if isinstance(obj, dict):
        for k, item in obj.items():
            yield from type_errors(item, f"{path}/{k}")
        return
    if not hasattr(obj, "to_json") or not hasattr(type(obj), "__annotations__"):
        return
    hints = typing.get_type_hints(type(obj))
    for name, hint in hints.items():
        value = getattr(obj, name, None)
        model = _model_class(hint)
        if model is not None and _raw(value):
            # The SDK keeps some nested objects (panel transformations) as the raw JSON:
            # decode them here so they are checked like the rest.
            raw = value
            value = ([model.from_json(v) for v in raw] if isinstance(raw, list)
                     else model.from_json(raw))
            yield from diff(raw, json.loads(json.dumps(value, cls=JSONEncoder)), f"{path}/{name}")
        if not _fits(value, hint):
            yield f"{path}/{name}: {value!r} is not {hint}"
        yield from type_errors(value, f"{path}/{name}")


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows, and panels collapsed into rows, included)."""
    for p in doc.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def variables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc.get("templating", {}).get("list", [])}


def used_variables(text: str) -> set[str]:
    return {a or b for a, b in VAR_RE.findall(text)} - BUILTIN


def rule_errors(doc: dict[str, Any]) -> Iterator[str]:
    """sockwatch's own rules for its dashboards (see the module docstring)."""
    vs = variables(doc)
    ds = vs.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        yield "templating: no variable 'datasource' of type datasource for prometheus"
    for name, v in vs.items():
        if v.get("type") == "query" and not str(v.get("query", "")).startswith("label_values("):
            yield f"templating/{name}: query variables come from label_values(...)"
    if "instance" not in vs:
        yield "templating: no variable 'instance'"
    ids = [p.get("id") for p in doc.get("panels", [])]
    if len(set(ids)) != len(ids) or None in ids:
        yield f"panels: ids must be set and unique, got {ids}"
    for p in panels(doc):
        where = f"panel {p.get('title')!r}"
        if not str(p.get("description", "")).strip():
            yield f"{where}: no description"
        elif "bad" not in p["description"].lower():
            yield f"{where}: the description does not say what a bad value looks like"
        if p.get("datasource", {}).get("uid") != "${datasource}":
            yield f"{where}: datasource is not the $datasource variable"
        if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
            yield f"{where}: every panel needs PromQL targets"
        for t in p.get("targets", []):
            for name in used_variables(t.get("expr", "")) - vs.keys():
                yield f"{where}: query uses ${name}, which the dashboard does not define"
        pos = p.get("gridPos", {})
        if pos.get("x", 0) + pos.get("w", 0) > 24:
            yield f"{where}: wider than the 24-column grid"
    for name, v in vs.items():
        for used in used_variables(json.dumps(v.get("query", ""))) - vs.keys():
            yield f"templating/{name}: uses ${used}, which the dashboard does not define"


def validate(doc: dict[str, Any]) -> list[str]:
    """Everything wrong with a dashboard document; empty when it is valid."""
    try:
        model = Dashboard.from_json(doc)
        again = json.loads(json.dumps(model, cls=JSONEncoder))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"the dashboard model cannot decode it: {exc!r}"]
    return [*diff(doc, again), *type_errors(model), *rule_errors(doc)]


# --------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------


def queries(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    for p in panels(doc):
        for t in p.get("targets", []):
            yield p, t


def substitute(expr: str, values: dict[str, str]) -> str:
    """Fill in template variables as Grafana would for a single selected value."""
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return VAR_RE.sub(one, expr)


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(\s*\()?", text):
        if not m.group(2) and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


# An HTTP API call: (path under /api/v1, query parameters) -> the decoded JSON reply.
Api = Callable[[str, dict[str, str]], dict[str, Any]]


@dataclass
class Answer:
    """One panel query as Prometheus answered it (series as a range: [[t, "v"], ...])."""

    panel: dict[str, Any]
    target: dict[str, Any]
    expr: str
    error: str | None
    series: list[dict[str, Any]]

    @property
    def has_data(self) -> bool:
        """Some series with a finite value: what Grafana would draw (NaN draws nothing)."""
        return any(math.isfinite(float(v)) for s in self.series for _, v in s["values"])


def evaluate(doc: dict[str, Any], api: Api, values: dict[str, str], start: float, end: float,
             step: float) -> list[Answer]:
    """Every query of a dashboard, run the way its panel runs it: instant at ``end``, or
    over [start, end] every ``step`` seconds; variables filled from ``values``."""
    answers = []
    for panel, t in queries(doc):
        expr = substitute(t["expr"], values)
        if t.get("instant"):
            reply = api("query", {"query": expr, "time": f"{end:.3f}"})
        else:
            reply = api("query_range", {"query": expr, "start": f"{start:.3f}",
                                        "end": f"{end:.3f}", "step": f"{step:g}"})
        if reply.get("status") != "success":
            answers.append(Answer(panel, t, expr, f"{reply.get('errorType')}: "
                                                  f"{reply.get('error')}", []))
            continue
        result = reply["data"]["result"]
        series = [{"metric": r["metric"], "values": r["values"] if "values" in r else [r["value"]]}
                  for r in result]
        answers.append(Answer(panel, t, expr, None, series))
    return answers
