"""The boot model: a provisioned board serves an anchor from its start, before any desired
state, reports it in its births, keeps it as the rollback target of its first deployment, and
starts with no model (and a warning) when the record or its segments are damaged."""
import json
import logging
import time

import numpy as np
import pytest

from device_agent.agent import Agent, AgentConfig
from device_agent.cache import (BOOT_FILE, BootModel, SegmentCache, SegmentRegistry, boot_model,
                                provision)
from device_agent.serving import Unavailable
from device_agent.worker import InlineWorker
from fleet_protocol.messages import Desired, State, decode
from fleet_runtime.mqtt import ClientHost
from fleetloop import T, Loop, healthy
from simulators.devices import CLASSES, SimResources, SimState

IMAGES = np.zeros((2, 32, 32), np.uint8)


def cheapest_anchor(catalog):
    """The anchor max_accuracy never keeps (the catalog fixture's accuracies rise with FLOPs)."""
    return min(catalog.anchors, key=lambda e: e.flops)


@pytest.fixture
def board(catalog, tmp_path):
    """make(dev_id) → an agent on a cache provisioned to boot the cheapest anchor, no broker."""
    host, made = ClientHost(), []

    def make(dev_id="rpi4-000", **cfg):
        agent = Agent(AgentConfig(dev_id, tmp_path / "board", **cfg),
                      SimResources(CLASSES["rpi4"], SimState()), host, SegmentRegistry(),
                      worker=InlineWorker())
        made.append(agent)
        return agent

    provision(SegmentCache(tmp_path / "board"), catalog, boot=cheapest_anchor(catalog).name)
    yield make
    for agent in made:
        agent.worker.stop()
    host.close()


def test_a_provisioned_board_serves_its_boot_model_until_the_first_deployment(loop, catalog):
    boot = cheapest_anchor(catalog)
    agent = loop.add_agent("rpi4-000", boot=boot.name)
    p = agent.infer(IMAGES)  # before any controller exists
    assert (p.model, p.name, p.generation, len(p.classes)) == (boot.id, boot.name, 0, 2)
    _, states = loop.spy("operator", T.state("rpi4-000"))

    def births():
        return [s for s in (decode(State, m) for _, m in states) if s.online]
    loop.run_until(lambda: births())
    assert (births()[-1].hybrid, births()[-1].generation) == (boot.id, 0)

    ctl = loop.start_controller()
    loop.run_until(lambda: "rpi4-000" in ctl.twins and ctl.twins["rpi4-000"].running)
    assert ctl.twins["rpi4-000"].running == boot.id  # the twin knows what runs
    loop.run_until(lambda: healthy(agent) >= 1 and not ctl.open)
    dep = ctl.store.deployments("rpi4-000")[0]
    assert dep.generation >= 1 and dep.hybrid != boot.id
    assert dep.reason.startswith("max_accuracy → ")  # planned from the boot model, not "nothing"
    p = agent.infer(IMAGES)
    assert (p.model, p.generation) == (dep.hybrid, dep.generation)
    assert isinstance(agent.slot.previous.desired, BootModel)  # the rollback target
    loop.run_until(lambda: births()[-1].generation == dep.generation)
    assert births()[-1].hybrid == dep.hybrid == ctl.twins["rpi4-000"].running


def test_the_controller_learns_from_a_boot_model_it_keeps(broker, catalog, tmp_path, keys):
    """A boot model kept (nothing gains min_gain over it) is measured like a deployed one."""
    boot = cheapest_anchor(catalog)
    lp = Loop(broker, catalog, tmp_path, keys, hysteresis={"min_dwell_s": 0, "min_gain": 1.0})
    try:
        agent = lp.add_agent("rpi4-001", boot=boot.name)
        ctl = lp.start_controller()
        lp.run_until(lambda: ctl.metrics.cost_errors.reports.get("rpi4-001", 0) >= 3)
        assert ctl.metrics.cost_errors.models["rpi4-001"] == [boot.id]  # measured on it
        assert ctl.twins["rpi4-001"].running == boot.id and ctl.twins["rpi4-001"].lat_p95_ms
        assert not ctl.store.deployments("rpi4-001") and agent.applied == 0  # kept: min_gain
        assert ctl.twins["rpi4-001"].booted
    finally:
        lp.close()


def test_a_deployment_rolled_back_returns_to_the_boot_model_across_a_restart(board, catalog):
    boot = cheapest_anchor(catalog)
    other = max(catalog.anchors, key=lambda e: e.flops)
    agent = board()
    agent._on_desired(Desired(device_id="rpi4-000", generation=1, deployment_id="rpi4-000.1",
                              hybrid=other.id, name=other.name, front=other.segments,
                              latency_budget_ms=1e-6, ts=time.time()))  # unhealthy at once
    assert agent.stats["ROLLED_BACK"] == 1 and agent.applied == 1
    assert (agent.slot.get().hybrid, agent.slot.get().generation) == (boot.id, 0)
    again = board()  # a restart: applied.json names the boot model it went back to
    assert (again.slot.get().hybrid, again.slot.get().generation, again.applied) == \
        (boot.id, 0, 1)
    assert again.infer(IMAGES).model == boot.id


@pytest.mark.parametrize("damage, why", [
    ("garbage", "Invalid JSON"),
    ("generation 3", "generation"),  # not to be taken for a deployment
    ("segment lost", "No such file"),
])
def test_a_damaged_boot_record_starts_the_agent_with_no_model(board, catalog, tmp_path, caplog,
                                                              damage, why):
    record = tmp_path / "board" / BOOT_FILE
    if damage == "garbage":
        record.write_bytes(b"\x00{not json")
    elif damage == "generation 3":
        record.write_text(json.dumps(json.loads(record.read_text()) | {"generation": 3}))
    else:
        SegmentCache(tmp_path / "board").path(cheapest_anchor(catalog).segments[-1]).unlink()
    with caplog.at_level(logging.WARNING, logger="device_agent.agent"):
        agent = board()
    assert agent.slot.get() is None
    assert "cannot serve the boot model" in caplog.text and why in caplog.text
    with pytest.raises(Unavailable):
        agent.infer(IMAGES)


def test_provision_sets_the_boot_model_and_refuses_one_not_provisioned(catalog, tmp_path):
    from restnet.cli import main

    boot = cheapest_anchor(catalog)
    other = next(e for e in catalog.anchors if e is not boot)
    assert main(["agent", "provision", "--catalog", str(catalog.root), "--cache",
                 str(tmp_path / "b"), "--anchor", boot.name, "--run", boot.name]) == 0
    record = BootModel.model_validate_json((tmp_path / "b" / BOOT_FILE).read_bytes())
    assert (record.hybrid, record.generation, record.front) == (boot.id, 0, boot.segments)
    with pytest.raises(SystemExit, match=f"boot model '{other.name}' is not among"):
        main(["agent", "provision", "--catalog", str(catalog.root), "--cache",
              str(tmp_path / "c"), "--anchor", boot.name, "--run", other.name])
    assert not SegmentCache(tmp_path / "c").ids()  # refused before anything was written
    with pytest.raises(ValueError, match="is a hybrid"):
        boot_model(SegmentCache(tmp_path / "b"), catalog, catalog.hybrids[0].id)
