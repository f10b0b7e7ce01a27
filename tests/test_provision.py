"""Per-class provisioning: simulated devices start with the anchors their class was provisioned
with, serving the first, fetch the segments a deployment needs that they lack, and the bytes of
segments and of stitches are counted apart (issue 9, item 3)."""
import pytest

from device_agent.cache import BOOT_FILE
from fleet_protocol.messages import encode
from simulators.fleet import Scenario, SimFleet

CHUNK = 64 * 1024  # the agent's default chunk size


def test_a_scenario_names_what_each_class_is_provisioned_with():
    s = Scenario.from_dict({"duration_s": 5, "provision": {"mcu": ["mnv3"], "jetson": []}})
    assert s.provision == {"mcu": ("mnv3",), "jetson": ()}
    assert Scenario.from_dict({"duration_s": 5}).provision is None  # every anchor
    for bad, why in [({"provision": {"tpu": ["res"]}}, "unknown device classes"),
                     ({"provision": {"mcu": "res"}}, "lists of anchor names"),
                     ({"provison": {}}, "unknown key")]:
        with pytest.raises(ValueError, match=why):
            Scenario.from_dict({"duration_s": 5, **bad})


def test_a_provision_naming_no_anchor_of_the_catalog_is_refused(catalog, tmp_path):
    with pytest.raises(ValueError,
                       match=r"\['resnet18'\] are not anchors.*\['mnv3', 'res', 'vit'\]"):
        SimFleet(1, "mqtt://127.0.0.1:1", catalog.root, tmp_path, provision={"mcu": ["resnet18"]})


def test_devices_fetch_what_they_lack_and_bytes_are_told_apart(loop, catalog, tmp_path):
    """An MCU provisioned with a hybrid's front anchor fetches only its back segments; a
    Jetson its class provisions with nothing fetches them all. The summary counts the chunks
    of exactly those segments as segment bytes, the desired states (stitch inline) apart."""
    from restnet.demo import summary

    h = next(e for e in catalog.hybrids if e.delta_bytes)
    h.stitch_state, h.test_acc = "finetuned", 0.99  # the one model the policy picks
    catalog.save()
    ctl = loop.start_controller()
    fleet = SimFleet(2, loop.broker.url, catalog.root, tmp_path / "fleet",
                     mix={"mcu": 1, "jetson": 1}, telemetry_period=0.3, host=loop.host,
                     trust=loop.trust, provision={"mcu": [h.front]})
    mcu, jetson = sorted(fleet.devices, key=lambda d: d.res.cls.name != "mcu")
    front_anchor = set(catalog.get(h.front).segments)
    assert set(mcu.agent.cache.ids()) == front_anchor and not jetson.agent.cache.ids()
    # the MCU serves its class's first anchor from the start (a boot record linked from the
    # master cache); the Jetson's class has none, so it serves nothing yet
    assert (mcu.agent.slot.get().hybrid, mcu.agent.slot.get().generation) == \
        (catalog.get(h.front).id, 0)
    assert (mcu.agent.cfg.cache_dir / BOOT_FILE).stat().st_nlink == 2
    assert jetson.agent.slot.get() is None
    fleet.start(loop.credentials(fleet.ids))
    loop.run_until(lambda: all(d.agent.stats["HEALTHY"] >= 1 for d in fleet.devices)
                   and not ctl.open, timeout=40)
    assert all(ctl.twins[d.id].running == h.id for d in fleet.devices)
    front, back = ctl.artifacts.split(h)
    assert set(mcu.agent.cache.ids()) == front_anchor | set(back)
    assert set(jetson.agent.cache.ids()) == set(front) | set(back)
    assert mcu.agent.stats["FETCHING"] >= 1 and jetson.agent.stats["FETCHING"] >= 1

    def chunk_bytes(seg_ids):  # what the controller publishes to send these segments once
        return sum(len(encode(idx.chunk(k))) for s in seg_ids
                   for idx in [ctl.artifacts.index(s, CHUNK)] for k in range(idx.total))

    once = chunk_bytes(back) + chunk_bytes(front + back)
    fleet.account(1.0)
    s = summary(ctl, fleet, 1.0)
    deps = ctl.store.deployments()
    assert s["segments_fetched"] == len(back) + len(front + back)
    # a chunk re-requested after a stall may go twice; nothing else travels as a chunk
    assert once <= s["segment_bytes"] < once + 2 * CHUNK
    assert s["stitch_bytes"] == sum(d.payload_bytes for d in deps) > 2 * h.delta_bytes
    assert s["bytes_sent"] == s["stitch_bytes"] + s["segment_bytes"]
    assert s["whole_model_bytes"] == len(deps) * h.model_bytes
    fleet.stop()
