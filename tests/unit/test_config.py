"""The issue-3 config keys: probes.stack_latency and metrics.top_interfaces.

Validated in-process through ``config.build``/``load`` (the daemon's full
exit-2-before-any-bpf() path is covered by tests/kernel/test_daemon.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sockwatch import config
from sockwatch.kernel.loader import LoaderConfig
from sockwatch.errors import UsageError


def test_stack_latency_defaults_on():
    cfg = config.build({})
    assert cfg["probes"]["stack_latency"] is True
    assert LoaderConfig.from_settings(cfg["probes"]).stack_latency is True


def test_stack_latency_off_reaches_the_loader():
    cfg = config.build({"probes": {"stack_latency": False}})
    assert LoaderConfig.from_settings(cfg["probes"]).stack_latency is False


@pytest.mark.parametrize("body, needles", [
    ({"probes": {"stack_latency": "yes"}}, ["probes.stack_latency", "bool", "str"]),
    ({"probes": {"stack_latency": 1}}, ["probes.stack_latency", "bool", "int"]),
    ({"probes": {"stack_latencies": True}}, ["unknown key probes.stack_latencies"]),
    ({"metrics": {"top_interfaces": 0}}, ["metrics.top_interfaces", "between"]),
    ({"metrics": {"top_interfaces": True}}, ["metrics.top_interfaces", "int"]),
])
def test_bad_values_name_the_key(body, needles):
    with pytest.raises(UsageError) as exc:
        config.build(body, "t.toml")
    for needle in needles:
        assert needle in str(exc.value)


def test_example_config_documents_and_round_trips_the_new_keys():
    text = config.to_toml_example()
    assert "stack_latency = true" in text and "top_interfaces = 64" in text
    assert config.build(tomllib.loads(text))["probes"]["stack_latency"] is True


def test_shipped_example_is_the_generated_one():
    """systemd/sockwatch.toml is what --print-example-config prints, key for key."""
    shipped = (Path(__file__).resolve().parents[2] / "systemd" / "sockwatch.toml").read_text()
    assert shipped == config.to_toml_example()
