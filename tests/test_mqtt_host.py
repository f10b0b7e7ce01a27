"""ClientHost against a real Mosquitto: many clients in one thread, wills, broker restarts."""
from __future__ import annotations

import random
import socket
import threading
from typing import Callable

import pytest

from fleet_runtime.mqtt import Backoff, ClientHost, make_client, parse_url, run_in_thread


@pytest.fixture
def broker(tmp_path):
    """These tests are about the transport (arbitrary topics, anonymous clients), so their
    broker runs without the fleet's logins and ACLs; every fleet test runs with them."""
    from simulators.broker import start_broker

    with start_broker(tmp_path / "broker", auth=False) as running:
        yield running


@pytest.fixture
def host():
    h = ClientHost()
    yield h
    h.close()


def subscriber(host: ClientHost, broker, topic: str, backoff: Backoff | None = None):
    """A client that (re)subscribes on every connect; returns it and the messages it got."""
    got: list = []
    sub = make_client("sub")
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    sub.on_subscribe = lambda c, u, mid, rcs, p: got.append("subscribed")
    sub.on_message = lambda c, u, msg: got.append(msg)
    host.add(sub, broker.host, broker.port, backoff=backoff)
    host.run(until=lambda: "subscribed" in got, timeout=10)
    assert "subscribed" in got
    got.clear()
    return sub, got


def add_paced(host: ClientHost, broker, clients: list,
              backoff: Callable[[], Backoff] | None = None) -> None:
    """Add clients 25 at a time, each batch connected before the next (listen backlog is 100)."""
    for i in range(0, len(clients), 25):
        for c in clients[i:i + 25]:
            host.add(c, broker.host, broker.port, backoff=backoff() if backoff else None)
        target = host.stats["connects"] + len(clients[i:i + 25])
        host.run(until=lambda: host.stats["connects"] >= target, timeout=10)
    assert all(c.is_connected() for c in clients)


def test_parse_url():
    assert parse_url("mqtt://127.0.0.1:18883") == ("127.0.0.1", 18883)
    assert parse_url("mqtt://broker.local") == ("broker.local", 1883)
    for bad in ("tcp://h:1", "mqtt://", "mqtt://h:notaport", "h:1883", "mqtt://h:1/x"):
        with pytest.raises(ValueError, match="mqtt://host"):
            parse_url(bad)


def test_200_clients_in_one_thread_publish_from_another(broker, host):
    sub, got = subscriber(host, broker, "t/#")
    clients = [make_client(f"c{i:03d}") for i in range(200)]
    add_paced(host, broker, clients)
    assert host.stats["connects"] == 201

    acked: list[int] = []
    all_in = threading.Event()

    def on_message(c, u, msg) -> None:
        got.append(msg)
        if len(got) == 200:
            all_in.set()

    sub.on_message = on_message
    for c in clients:
        c.on_publish = lambda c, u, mid, rc, p: acked.append(mid)
    thread = run_in_thread(host)
    try:
        for i, c in enumerate(clients):  # publish() from this thread while the host runs there
            assert c.publish(f"t/{i}", f"m{i}".encode(), qos=1).rc == 0
        assert all_in.wait(10), f"{len(got)} of 200 delivered"
    finally:
        host.stop()
        thread.join(5)
    assert not thread.is_alive()
    assert sorted(m.topic for m in got) == sorted(f"t/{i}" for i in range(200))
    host.run(until=lambda: len(acked) == 200, timeout=10)
    assert len(acked) == 200


def test_will_is_published_and_retained_on_abrupt_close(broker, host):
    _, got = subscriber(host, broker, "dev/+/state")
    # a back-off whose first delay (seeded) is ~50 s: the dead device stays dead in this test
    dying = make_client("dev-1", will=("dev/dev-1/state", b"offline"))
    dying.on_connect = lambda c, u, f, rc, p: c.publish("dev/dev-1/state", b"online", 1, True)
    host.add(dying, broker.host, broker.port, backoff=Backoff(60, 60, random.Random(0)))
    host.run(until=lambda: len(got) == 1, timeout=10)
    assert [m.payload for m in got] == [b"online"]

    dying.socket().shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker must send the will
    host.run(until=lambda: len(got) == 2, timeout=10)
    assert got[1].payload == b"offline"
    assert host.stats["disconnects"] == 1
    host.remove(dying)

    late, late_got = make_client("late"), []
    late.on_connect = lambda c, u, f, rc, p: c.subscribe("dev/+/state", qos=1)
    late.on_message = lambda c, u, msg: late_got.append(msg)
    host.add(late, broker.host, broker.port)
    host.run(until=lambda: late_got, timeout=10)
    assert [(m.payload, m.retain) for m in late_got] == [(b"offline", True)]


def test_clients_reconnect_with_jittered_backoff_after_broker_restart(broker, host):
    def fast() -> Backoff:  # each client needs its own; short delays keep the test quick
        return Backoff(base=0.05, cap=1.0)

    _, got = subscriber(host, broker, "r/#", backoff=fast())
    clients = [make_client(f"r{i:02d}") for i in range(50)]
    add_paced(host, broker, clients, backoff=fast)

    broker.kill()
    host.run(until=lambda: host.stats["disconnects"] == 51, timeout=10)
    assert not any(c.is_connected() for c in clients)
    host.run(until=lambda: host.stats["connect_failures"] >= 51, timeout=10)  # broker still down
    assert host.stats["connect_failures"] >= 51

    broker.restart()
    host.run(until=lambda: host.stats["reconnects"] == 51 and "subscribed" in got, timeout=15)
    assert host.stats["reconnects"] == 51 and all(c.is_connected() for c in clients)
    got.clear()
    for i, c in enumerate(clients):
        c.publish(f"r/{i}", b"back", qos=1)
    host.run(until=lambda: len(got) == 50, timeout=10)
    assert sorted(m.topic for m in got) == sorted(f"r/{i}" for i in range(50))


def test_backoff_is_jittered_exponential_and_capped():
    b = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(40)]
    assert all(0 <= d <= min(4.0, 0.5 * 2 ** i) for i, d in enumerate(delays))
    assert len(set(delays)) == len(delays)  # jittered, not one fixed step
    assert max(delays[5:]) > 2.0  # the ceiling did grow to the cap
    b.reset()
    assert b.next_delay() <= 0.5
