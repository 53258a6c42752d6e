"""The Grafana dashboards in grafana/dashboards/: generated from grafana/build.py,
valid against Grafana's dashboard model, and following sockwatch's own rules
(a description on every panel, the datasource/instance/process variables).

The negative cases break one thing each in a valid dashboard and check the
validator names it: a validator that accepted everything would fail here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from grafana import build, model

DASHBOARDS = sorted(build.OUT.glob("*.json"))


def load(name: str) -> dict[str, Any]:
    return json.loads((build.OUT / f"{name}.json").read_text())


def test_all_four_dashboards_are_committed() -> None:
    assert {p.stem for p in DASHBOARDS} == set(build.DASHBOARDS)


@pytest.mark.parametrize("name", list(build.DASHBOARDS))
def test_committed_json_is_what_the_generator_builds(name: str) -> None:
    assert (build.OUT / f"{name}.json").read_text() == build.render_json(build.build(name)), (
        "run: python -m grafana.build")


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch, capsys) -> None:
    for name in build.DASHBOARDS:
        (tmp_path / f"{name}.json").write_text(build.render_json(build.build(name)))
    monkeypatch.setattr(build, "OUT", tmp_path)
    assert build.main(["--check"]) == 0
    (tmp_path / "health.json").write_text("{}\n")
    assert build.main(["--check"]) == 1
    assert "health.json" in capsys.readouterr().err


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert model.validate(doc) == []
    assert doc["schemaVersion"] == build.SCHEMA_VERSION
    assert doc["uid"].startswith("sockwatch-") and len(doc["uid"]) <= 40
    vs = model.variables(doc)
    assert vs["datasource"]["type"] == "datasource"
    assert vs["instance"]["query"] == "label_values(sockwatch_build_info, instance)"
    shown = list(model.panels(doc))
    assert shown and all(p["description"].strip() for p in shown)


@pytest.mark.parametrize("name", ["host-overview", "process-drilldown"])
def test_process_dashboards_have_a_process_variable(name: str) -> None:
    v = model.variables(load(name))["process"]
    assert v["type"] == "query" and v["query"].startswith("label_values(sockwatch_connections{")


def test_histograms_are_drawn_from_bucket_rates() -> None:
    """p50/p99 come from histogram_quantile over _bucket rates, heatmaps from bucket rates."""
    kinds: dict[str, int] = {}
    for name in build.DASHBOARDS:
        for panel, t in model.queries(load(name)):
            if "histogram_quantile" in t["expr"]:
                assert "_bucket{" in t["expr"] and "rate(" in t["expr"], t["expr"]
                kinds["quantile"] = kinds.get("quantile", 0) + 1
            if panel["type"] == "heatmap":
                assert t["format"] == "heatmap" and "_bucket{" in t["expr"], t["expr"]
                assert panel["options"]["calculate"] is False
                kinds["heatmap"] = kinds.get("heatmap", 0) + 1
    assert kinds["quantile"] >= 10 and kinds["heatmap"] >= 8, kinds


BREAKS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "misspelt panel key": (lambda d: d["panels"][1].update(descripton="x"),
                           "/panels/1/descripton: not in the dashboard model"),
    "misspelt query key": (lambda d: d["panels"][1]["targets"][0].update(exp="up"),
                           "/panels/1/targets/0/exp: not in the dashboard model"),
    "unknown heatmap option": (lambda d: d["panels"][9]["options"].update(calculat=False),
                               "/panels/9/options/calculat: not in the dashboard model"),
    "misspelt transformation": (lambda d: d["panels"][-1]["transformations"][0].update(idd="m"),
                                "transformations/0/idd: not in the dashboard model"),
    "string where an int belongs": (lambda d: d["panels"][1]["gridPos"].update(h="8"),
                                    "/grid_pos/h: '8' is not"),
    "unknown variable type": (lambda d: d["templating"]["list"][1].update(type="querry"),
                              "'querry' is not <enum 'VariableType'>"),
    "panels not a list": (lambda d: d.update(panels=5), "the dashboard model cannot decode it"),
    "panel without description": (lambda d: d["panels"][1].pop("description"),
                                  "panel 'Connections by state': no description"),
    "description without a bad value": (
        lambda d: d["panels"][1].update(description="Live TCP sockets by state."),
        "panel 'Connections by state': the description does not say what a bad value"),
    "no instance variable": (lambda d: d["templating"]["list"].pop(1),
                             "templating: no variable 'instance'"),
    "query uses an undefined variable": (
        lambda d: d["panels"][1]["targets"][0].update(expr='up{job="$job"}'),
        "query uses $job, which the dashboard does not define"),
    "fixed datasource": (lambda d: d["panels"][1]["datasource"].update(uid="P1809F7CD0C75ACF3"),
                         "datasource is not the $datasource variable"),
}


@pytest.mark.parametrize("what", list(BREAKS))
def test_validator_rejects_an_invalid_dashboard(what: str) -> None:
    doc = load("host-overview")
    assert model.validate(doc) == []
    broken = copy.deepcopy(doc)
    change, message = BREAKS[what]
    change(broken)
    problems = model.validate(broken)
    assert any(message in p for p in problems), problems


def test_substitute_fills_every_variable_or_says_which_is_missing() -> None:
    expr = 'rate(x{instance=~"$instance", p="${process}"}[$__rate_interval])'
    got = model.substitute(expr, {"instance": "h:1", "process": "nginx", "__rate_interval": "30s"})
    assert got == 'rate(x{instance=~"h:1", p="nginx"}[30s])'
    with pytest.raises(KeyError, match="process"):
        model.substitute(expr, {"instance": "h:1", "__rate_interval": "30s"})


def test_metric_names_are_the_selected_series_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, role) (rate(a_seconds_bucket{x="b_c"}[5m]))) '
            '/ on (instance) group_left (version) build_info and on (instance) up offset 5m')
    assert model.metric_names(expr) == {"a_seconds_bucket", "build_info", "up"}
    assert model.metric_names("max(time() - start_time_seconds{i=~\"$i\"})") == {
        "start_time_seconds"}
