"""Issue 10 against a real Mosquitto (logins, ACLs, the generated config): one device with a
valid login cannot take the controller's session, nor stall another device's reaction by
flooding artifact requests, nor get a retained request served after a restart."""
import statistics
import time

from fleet_protocol.messages import (ArtifactRequest, Capabilities, ControllerState, State,
                                     Telemetry, decode, encode)
from fleet_runtime.mqtt import make_client, parse_url
from fleetloop import T, healthy
from simulators.broker import connack


def device_client(loop, dev, topics=()):
    """A raw client with device `dev`'s login, recording (topic, payload) of `topics`."""
    got = []
    c = make_client(dev, **loop.login(dev))
    c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    c.on_connect = lambda cl, u, f, rc, p: topics and cl.subscribe([(x, 1) for x in topics])
    loop.host.add(c, *parse_url(loop.broker.url))
    loop.run_until(c.is_connected)
    return c, got


def test_a_device_cannot_take_over_the_controllers_session(loop):
    ctl = loop.start_controller()
    agent = loop.add_agent("rpi4-200")
    loop.run_until(lambda: healthy(agent) >= 1)
    _, got = device_client(loop, "peek", [T.ctl_state])
    loop.run_until(lambda: got)
    session = decode(ControllerState, got[-1][1]).session  # retained: any device reads it
    creds = loop.credentials(["evil"])
    for client_id in [f"controller-{session}", "controller"]:
        for _ in range(5):
            rc = connack(loop.broker.host, loop.broker.port, "evil", creds["evil"],
                         client_id=client_id)
            assert rc is not None and not rc.is_failure
    heard = ctl.stats["in_telemetry"]
    loop.run_until(lambda: ctl.stats["in_telemetry"] >= heard + 5)  # the controller still hears
    assert loop.host.stats["disconnects"] == 0 and loop.host.stats["reconnects"] == 0


def react(loop, agent, battery, during=lambda: None):
    """Set the agent's battery and wait until the controller saw it adapt (its twin runs
    another model); the reaction (ms)."""
    ctl = loop.controller
    dev = agent.cfg.device_id
    before, n = ctl.twins[dev].running, len(ctl.metrics.reactions_ms)
    agent.resources.state.battery = battery

    def done():
        during()
        return ctl.twins[dev].running != before and len(ctl.metrics.reactions_ms) > n
    loop.run_until(done, timeout=30)
    return ctl.metrics.reactions_ms[-1]


def test_an_artifact_flood_does_not_delay_another_devices_reaction(loop, catalog):
    ctl = loop.start_controller()
    victim = loop.add_agent("rpi4-201", battery=0.9)
    # settled when the controller has the agent's HEALTHY ack, not when the agent sent it
    loop.run_until(lambda: ctl.metrics.reactions_ms and ctl.twins["rpi4-201"].running)
    # the attacker: a device with a valid login, whose desired state needs segments it lacks
    evil, _ = device_client(loop, "evil")  # reads no chunks: the broker drops them
    evil.publish(T.state("evil"), encode(State(
        device_id="evil", online=True, session=1, ts=time.time(),
        capabilities=Capabilities(device_class="rpi4", mem_mb=4096, gflops=10))), qos=1)
    evil.publish(T.telemetry("evil"), encode(Telemetry(
        seq=1, ts=time.time(), cpu=0.1, mem_free_mb=900, battery=0.9, temp_c=40)), qos=1)
    loop.run_until(lambda: ctl.needs.get("evil"))
    wanted = sorted(ctl.needs["evil"])

    idle = [react(loop, victim, b) for b in (0.1, 0.9, 0.1, 0.9, 0.1)]
    sent = {"requests": 0, "bytes": 0}

    def flood():  # 50 requests for every pass of the loop, each for all chunks at 1 KiB
        for k in range(50):
            payload = encode(ArtifactRequest(artifact=wanted[k % len(wanted)], chunk_size=1024))
            evil.publish(T.art_req("evil"), payload, qos=0)
            sent["requests"] += 1
            sent["bytes"] += len(payload)

    t0, out0 = time.monotonic(), ctl.metrics.chunk_bytes
    flooded = [react(loop, victim, b, during=flood) for b in (0.9, 0.1, 0.9, 0.1, 0.9)]
    elapsed = time.monotonic() - t0
    served = ctl.serving.stats["req_queued"]
    out = ctl.metrics.chunk_bytes - out0
    print(f"reaction median idle {statistics.median(idle):.1f} ms, flooded "
          f"{statistics.median(flooded):.1f} ms; {sent['requests']} requests "
          f"({sent['bytes']} B) in {elapsed:.1f} s, {ctl.stats['in_art_req']} heard, "
          f"{served} served, {out} B out "
          f"({out / sent['bytes']:.2f} B out per B in)")
    # The 2x target is a bench figure; on 2 shared cores a test allows fixed slack on top,
    # still far below the seconds-long stall of a controller that serves a flood inline.
    assert statistics.median(flooded) <= 2 * statistics.median(idle) + 250, (idle, flooded)
    limits = ctl.serving.limits
    assert served <= limits.request_burst + limits.requests_per_s * (elapsed + 5)
    assert ctl.stats["errors"] == 0 and ctl.stats["art_throttled"] > 0


def test_a_retained_artifact_request_is_not_served_after_a_restart(loop, catalog):
    evil, _ = device_client(loop, "evil")
    seg = catalog.anchors[0].segments[0]
    info = evil.publish(T.art_req("evil"), encode(ArtifactRequest(artifact=seg)), qos=1,
                        retain=True)
    loop.run_until(info.is_published)
    ctl = loop.start_controller()  # subscribes, and the broker hands it the retained request
    ctl.needs["evil"] = frozenset([seg])  # even for a segment it would be allowed to fetch
    loop.run_until(lambda: ctl.stats["art_retained_ignored"] >= 1)
    assert ctl.stats["art_queued"] == 0 and ctl.serving.stats["chunks"] == 0
