"""fleet.yaml: the example loads, every mistake names its field and line, overrides merge."""
from pathlib import Path

import pytest

from fleet_controller.policy import (FleetPolicy, PolicyError, effective_rule, load_policy,
                                     parse_policy, policy_schema)

ROOT = Path(__file__).resolve().parents[1]

BASE = """\
catalog: cat
defaults:
  objective: max_accuracy
  constraints: {latency_p95_ms: 50, min_accuracy: 0.7, max_mem_fraction: 0.5}
  battery_modes:
    - {below: 0.15, objective: min_energy, min_accuracy: 0.6}
    - {below: 0.4, objective: min_energy}
  hysteresis: {min_dwell_s: 20, min_gain: 0.005}
groups:
  - name: cameras
    match: {classes: [jetson, rpi4], tags: {site: north}}
    constraints: {latency_p95_ms: 30}
  - name: north
    match: {tags: {site: north}}
    constraints: {latency_p95_ms: 40, max_temp_c: 70}
    hysteresis: {min_dwell_s: 5}
  - name: pis
    match: {classes: [rpi4]}
    battery_modes: [{below: 0.2, objective: min_latency}]
devices:
  cam-007: {objective: min_latency, constraints: {min_accuracy: 0.8}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_the_example_policy_loads():
    policy = load_policy(ROOT / "fleet.yaml")
    assert policy.catalog == ROOT / ".restnet" / "catalog"
    assert policy.rollout.waves == [10, 50, 100]
    assert [g.name for g in policy.groups] == ["cameras"]
    assert policy.devices["jetson-000"].objective == "min_latency"  # a device the demo runs


def test_the_between_anchors_policy_loads_and_differs_only_in_budgets():
    demo, between = load_policy(ROOT / "fleet.yaml"), load_policy(
        ROOT / "scenarios" / "fleet-between.yaml")
    assert between.catalog == demo.catalog and between.defaults == demo.defaults
    budgets = {c: effective_rule(between, f"{c}-000", c, {}).latency_p95_ms
               for c in ("mcu", "rpi3", "rpi4", "jetson")}
    assert budgets == {"mcu": 50, "rpi3": 20, "rpi4": 8, "jetson": 1}
    from simulators.cli import load_scenario

    demo_events = load_scenario(ROOT / "scenarios" / "demo.yaml")
    boots = load_scenario(ROOT / "scenarios" / "between.yaml")  # its scenario: the same events
    assert boots.events == demo_events.events and boots.duration_s == demo_events.duration_s
    assert {c: p[0] for c, p in boots.provision.items()} == dict.fromkeys(budgets, "mnv3-050")


def test_relative_catalog_is_taken_from_the_policy_folder(tmp_path, monkeypatch):
    path = write(tmp_path, "catalog: here/cat\n")
    assert load_policy(path).catalog == tmp_path / "here/cat"
    monkeypatch.chdir(tmp_path.parent)  # a relative policy path still gives an absolute catalog
    assert load_policy(Path(tmp_path.name) / "fleet.yaml").catalog == tmp_path / "here/cat"
    assert load_policy(write(tmp_path, "catalog: /abs/cat\n")).catalog == Path("/abs/cat")


@pytest.mark.parametrize("text, field, line, words", [
    ("catalog: c\ndefaults:\n  constraints:\n    latency_p95: 50\n",
     "defaults.constraints.latency_p95", 4,
     ["unknown key 'latency_p95'", "did you mean 'latency_p95_ms'?", "max_temp_c"]),
    ("catalog: c\ngrups: []\n", "grups", 2, ["did you mean 'groups'?"]),
    ("catalog: c\ndevices:\n  cam-1:\n    objectiv: min_energy\n", "devices.cam-1.objectiv", 4,
     ["did you mean 'objective'?"]),
    ("catalog: c\nreconcile_interval_s: soon\n", "reconcile_interval_s", 2,
     ["valid number", "'soon'"]),
    ("catalog: c\ndefaults:\n  finetune_on_demand: maybe\n", "defaults.finetune_on_demand", 3,
     ["'maybe'"]),
    ("catalog: c\ndefaults:\n  objective: max_acuracy\n", "defaults.objective", 3,
     ["did you mean 'max_accuracy'?"]),
    ("catalog: c\ndefaults:\n  battery_modes:\n    - {below: 0.1}\n    - {below: 1.5}\n",
     "defaults.battery_modes[1].below", 5, ["less than or equal to 1", "0.15 for 15%"]),
    ("catalog: c\ndefaults:\n  constraints:\n    min_accuracy: 70\n",
     "defaults.constraints.min_accuracy", 4, ["got 70", "fractions"]),
    ("catalog: c\nrollout:\n  wave_interval_s: 5\n  waves: [10, 5, 100]\n", "rollout.waves", 4,
     ["strictly increasing"]),
    ("catalog: c\nrollout:\n  waves:\n    - 10\n    - 50\n", "rollout.waves", 4, ["end at 100"]),
    ("catalog: c\ngroups:\n  - name: a\n  - name: a\n", "groups", 3, ["unique", "'a'"]),
    ("catalog: c\ngroups:\n  - name: b\n  - match: {}\n", "groups[1].name", 4, ["missing"]),
    ("catalog: c\ngroups:\n  - name: a\n    match:\n      tags: {site: 7}\n",
     "groups[0].match.tags.site", 5, ["quote it"]),
    ("catalog: c\ndevices:\n  ok: {}\n  a/b: {}\n", "devices.a/b", 4, ["one MQTT topic level"]),
    ("catalog: c\ndefaults:\n  objective: min_energy\n  objective: max_accuracy\n",
     "defaults.objective", 4, ["appears twice"]),
    ("defaults: {}\n", "catalog", 1, ["missing"]),
])
def test_each_mistake_names_field_and_line(tmp_path, text, field, line, words):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    problem = exc.value.problems[0]
    assert (problem.field, problem.line) == (field, line), exc.value
    message = str(exc.value)
    assert f"{path}:{line}: {field}:" in message
    for w in words:
        assert w.lower() in message.lower(), message


@pytest.mark.parametrize("text, line", [
    ("catalog: c\ndefaults:\n  objective: max_accuracy\n   constraints: {}\n", 4),
    ("catalog: c\ngroups: [a,\n", 3),
    ("catalog: c\ndevices:\n\tcam: {}\n", 3),
])
def test_yaml_syntax_errors_give_the_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError, match=rf"{path}:{line}: YAML syntax error"):
        load_policy(path)


def test_several_problems_are_all_reported():
    with pytest.raises(PolicyError) as exc:
        parse_policy("catalog: c\nreconcile_interval_s: -1\nrollout: {waves: [100, 50]}\n",
                     "p.yaml")
    assert [p.line for p in exc.value.problems] == [2, 3]
    assert str(exc.value).startswith("2 problems in policy p.yaml")


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="catalog"):
        parse_policy("", "empty.yaml")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")
    assert issubclass(PolicyError, ValueError)


def test_precedence_device_over_groups_over_defaults():
    p = parse_policy(BASE)
    r = effective_rule(p, "cam-007", "rpi4", {"site": "north"})
    assert r.sources == ("defaults", "group:cameras", "group:north", "group:pis", "device:cam-007")
    assert r.objective == "min_latency"  # device
    assert r.min_accuracy == 0.8  # device, key by key
    assert r.latency_p95_ms == 40  # the later group `north` overrides `cameras`
    assert r.max_temp_c == 70  # group
    assert r.max_mem_fraction == 0.5  # defaults, untouched by the overrides
    assert (r.min_dwell_s, r.min_gain) == (5, 0.005)  # hysteresis merges key by key
    assert [(m.below, m.objective) for m in r.battery_modes] == [(0.2, "min_latency")]


def test_groups_match_by_class_and_tags():
    p = parse_policy(BASE)
    assert effective_rule(p, "j1", "jetson", {"site": "north"}).sources == (
        "defaults", "group:cameras", "group:north")
    assert effective_rule(p, "j2", "jetson", {"site": "south"}).sources == ("defaults",)
    assert effective_rule(p, "r1", "rpi4", {}).sources == ("defaults", "group:pis")
    plain = effective_rule(p, "x", "esp32", {"site": "south", "room": "2"})
    assert (plain.objective, plain.latency_p95_ms, plain.min_accuracy) == ("max_accuracy", 50, 0.7)
    assert [m.below for m in plain.battery_modes] == [0.15, 0.4]  # sorted, lowest first


def test_builtin_values_fill_what_no_layer_sets():
    r = effective_rule(parse_policy("catalog: c\n"), "d", "unknown", {})
    assert r.latency_p95_ms == float("inf") and r.min_accuracy == 0.0
    assert r.finetune_on_demand is True and r.battery_modes == ()


def test_schema_describes_the_policy():
    schema = policy_schema()
    assert schema["type"] == "object"
    assert set(schema["properties"]) == set(FleetPolicy.model_fields)
    assert schema["required"] == ["catalog"]
    assert schema["additionalProperties"] is False
