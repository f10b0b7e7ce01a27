"""Trust: a device applies only desired states signed by a key it trusts, addressed to it and
newer than what it runs; everything else is refused by name while the old model serves. Keys
rotate while the fleet runs."""
import base64
import json
import time

import numpy as np

from fleet_controller.cli import keys_main
from fleet_protocol.messages import Ack, Desired, decode
from fleet_protocol.signing import KeyDir, Keyring, SigningKey, seal
from fleetloop import T, Loop, healthy


def desired_for(ctl, dev, hybrid, generation, **kw):
    front, back = ctl.artifacts.split(hybrid)
    fields = dict(device_id=dev, generation=generation, deployment_id=f"{dev}.x{generation}",
                  hybrid=hybrid.id, front=front, back=back, stitch=ctl.artifacts.delta(hybrid),
                  ts=time.time()) | kw
    return Desired(**fields)


def push(loop, client, acks, dev, payload, generation):
    """Publish a desired state to `dev` and return its terminal ack for `generation`."""
    acks.clear()
    client.publish(T.desired(dev), payload, qos=1)

    def final():
        return next((a for a in (decode(Ack, p) for _, p in acks)
                     if a.generation == generation and a.status in ("FAILED", "HEALTHY")), None)
    loop.run_until(lambda: final() is not None)
    return final()


def test_forged_tampered_foreign_and_replayed_desired_states_are_refused(loop, catalog, keys):
    ctl = loop.start_controller()
    dev = "rpi4-001"
    agent = loop.add_agent(dev)
    loop.run_until(lambda: healthy(agent) >= 1)
    before, applied = loop.running(dev), agent.applied
    hybrid = next(e for e in catalog.hybrids if e.id != before)
    trusted, _ = KeyDir(keys).load()
    client, acks = loop.spy("operator", T.ack(dev))

    g = applied + 10
    blob = bytearray(base64.b64decode(ctl.artifacts.delta(hybrid).data))
    blob[len(blob) // 2] ^= 0x01  # one flipped bit, same size, signed anyway
    bad_delta = ctl.artifacts.delta(hybrid).model_copy(
        update={"data": base64.b64encode(bytes(blob)).decode()})
    tampered = json.loads(seal(desired_for(ctl, dev, hybrid, g + 2), [trusted]))
    tampered["body"] = tampered["body"].replace(hybrid.id, before)  # the signed body, edited
    cases = [  # (payload, generation, what the FAILED reason must say)
        (desired_for(ctl, dev, hybrid, g).model_dump_json().encode(), g, "not signed"),
        (seal(desired_for(ctl, dev, hybrid, g + 1), [SigningKey.generate()]), g + 1,
         "untrusted key"),
        (json.dumps(tampered).encode(), g + 2, "bad signature"),
        (seal(desired_for(ctl, "rpi4-777", hybrid, g + 3), [trusted]), g + 3,
         "addressed to device rpi4-777"),
    ]
    for payload, generation, reason in cases:
        ack = push(loop, client, acks, dev, payload, generation)
        assert ack.status == "FAILED" and reason in ack.reason, (reason, ack)
        assert loop.running(dev) == before and agent.applied == applied  # nothing changed
    # signed correctly but its stitch tensors fail their hash: verified, then refused
    ack = push(loop, client, acks, dev, seal(desired_for(ctl, dev, hybrid, g + 4,
                                                         stitch=bad_delta), [trusted]), g + 4)
    assert ack.status == "FAILED" and "sha256" in ack.reason
    assert loop.running(dev) == before
    # the old model kept serving
    assert len(agent.infer(np.zeros((2, 32, 32), np.uint8)).classes) == 2
    # a good one still goes through, and an older generation after it is a replay
    ack = push(loop, client, acks, dev, seal(desired_for(ctl, dev, hybrid, g + 5), [trusted]),
               g + 5)
    assert ack.status == "HEALTHY", ack
    ack = push(loop, client, acks, dev, seal(desired_for(ctl, dev, hybrid, g + 4), [trusted]),
               g + 4)
    assert ack.status == "FAILED" and "replayed" in ack.reason
    assert agent.stats["refused"] == 4 and agent.stats["replayed"] == 1
    assert agent.stats["errors"] == 0


def test_keys_rotate_and_retire_while_the_fleet_runs(broker, catalog, tmp_path):
    keydir = KeyDir(tmp_path / "keys")
    first = keydir.init()
    lp = Loop(broker, catalog, tmp_path, keydir.root)
    try:
        ctl = lp.start_controller()
        agent = lp.add_agent("rpi4-050")
        lp.run_until(lambda: healthy(agent) >= 1)
        second = keydir.rotate()  # the controller notices within its 2 s reload period
        lp.run_until(lambda: set(agent.keyring.keys) == {first.id, second.id})
        agent.resources.state.battery = 0.1  # a new deployment, signed with the new key
        lp.run_until(lambda: healthy(agent) >= 2 and ctl.signing.id == second.id)
        lp.run_until(lambda: ctl.twins["rpi4-050"].keys_seq >= ctl.store.meta("keys")["since"])
        assert keys_main(["retire", str(keydir.root), "--state-dir", str(tmp_path / "ctl")]) == 0
        lp.run_until(lambda: set(agent.keyring.keys) == {second.id})

        def saved() -> set[str]:  # written by the agent's worker thread, just after
            return set(Keyring.from_json((agent.cfg.cache_dir / "trust.json").read_bytes()).keys)
        lp.run_until(lambda: saved() == {second.id})  # a restarted agent trusts the new key only
        client, acks = lp.spy("operator", T.ack("rpi4-050"))
        gen = agent.applied + 1
        ack = push(lp, client, acks, "rpi4-050", seal(desired_for(
            ctl, "rpi4-050", catalog.hybrids[0], gen), [first]), gen)
        assert ack.status == "FAILED" and "untrusted key" in ack.reason
        assert agent.stats["errors"] == 0
    finally:
        lp.close()
