"""Per-device credentials and `%u` ACLs on a real Mosquitto (fleet_runtime.brokerconf)."""
from __future__ import annotations

import base64
import datetime
import ipaddress
import itertools
import shutil
import subprocess
import threading

import pytest

from fleet_controller.cli import broker_main
from fleet_runtime.brokerconf import (MAX_QUEUED_BYTES, MEMORY_LIMIT, Credentials, TlsFiles,
                                       hash_password)
from fleet_protocol.messages import MAX_MESSAGE_BYTES
from fleet_runtime.mqtt import ClientHost, make_client
from simulators.broker import MOSQUITTO, connack, start_broker

pytestmark = pytest.mark.skipif(not MOSQUITTO.exists(), reason="mosquitto not installed")
R = "fleet/v1"
NOT_AUTHORIZED = 135
OK = (0, 16)  # PUBACK: success, or "no matching subscribers"
_ids = itertools.count()


class Peer:
    """A logged-in paho client (own loop thread) recording messages, PUBACKs and SUBACKs."""

    def __init__(self, broker, user: str, password: str | None = None) -> None:
        self.cond = threading.Condition()
        self.msgs: list[tuple[str, bytes]] = []
        self.acks: dict[int, object] = {}
        self.connected: list[object] = []
        self.disconnected: list[object] = []
        password = broker.creds[user] if password is None else password
        self.c = make_client(f"t{next(_ids)}-{user}", username=user, password=password)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self._put(self.connected.append, rc)
        self.c.on_disconnect = lambda _c, _u, _f, rc, _p: self._put(self.disconnected.append, rc)
        self.c.on_message = lambda _c, _u, m: self._put(self.msgs.append, (m.topic, m.payload))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self._put(self.acks.__setitem__, mid, rc)
        self.c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._put(self.acks.__setitem__, mid,
                                                                     rcs)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.wait(lambda: self.connected)
        assert not self.connected[0].is_failure, self.connected[0]

    def _put(self, fn, *args) -> None:
        with self.cond:
            fn(*args)
            self.cond.notify_all()

    def wait(self, pred, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "timed out"

    def pub(self, topic: str, payload: bytes = b"x", retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code."""
        mid = self.c.publish(topic, payload, qos=1, retain=retain).mid
        self.wait(lambda: mid in self.acks)
        return self.acks[mid].value

    def sub(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK reason codes."""
        _, mid = self.c.subscribe([(f, 1) for f in filters])
        self.wait(lambda: mid in self.acks)
        return [rc.value for rc in self.acks[mid]]

    def got(self, topic: str, payload: bytes | None = None) -> list[bytes]:
        with self.cond:
            return [p for t, p in self.msgs if t == topic and payload in (None, p)]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def make_tls(d) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject, pub, ca: bool):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("test CA"))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    files = TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key")
    files.cafile.write_bytes(cert("test CA", ca_key.public_key(), True))
    files.certfile.write_bytes(cert("127.0.0.1", key.public_key(), False))
    files.keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-broker")
    tls = make_tls(d)
    with start_broker(d / "broker", auth=True, devices=["d1", "d2"], tls=tls,
                      operators=["ops1"]) as running:
        running.tls_files = tls
        yield running


@pytest.fixture
def peer(broker):
    made: list[Peer] = []

    def connect(user: str) -> Peer:
        made.append(Peer(broker, user))
        return made[-1]

    yield connect
    for p in made:
        p.close()


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="no mosquitto_passwd")
def test_hash_matches_mosquitto_passwd(tmp_path):
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "alice", "s3cret"], check=True)
    user, line = f.read_text().strip().split(":", 1)
    _, seven, iterations, salt, _ = line.split("$")
    assert (user, seven, len(base64.b64decode(salt))) == ("alice", "7", 12)
    assert hash_password("s3cret", salt=base64.b64decode(salt),
                         iterations=int(iterations)) == line
    assert hash_password("s3cret") != hash_password("s3cret")  # fresh salts


def test_logins(broker):
    assert broker.creds.keys() == {"controller", "ops1", "d1", "d2"}
    assert all(":$7$101$" in x for x in (broker.workdir / "passwd").read_text().splitlines())
    assert not connack(broker.host, broker.port, "d1", broker.creds["d1"]).is_failure
    for user, pw in [("d1", "wrong"), ("d1", broker.creds["d2"]), (None, None)]:
        rc = connack(broker.host, broker.port, user, pw)
        assert rc is not None and rc.value == NOT_AUTHORIZED, (user, rc)


def test_device_publishes_only_on_its_own_topics(peer):
    ctl, d1 = peer("controller"), peer("d1")
    assert ctl.sub(f"{R}/dev/+/#") == [1]
    for leaf in ("telemetry", "state", "ack"):
        assert d1.pub(f"{R}/dev/d2/{leaf}", b"forged") == NOT_AUTHORIZED
    for leaf in ("telemetry", "state", "ack"):
        assert d1.pub(f"{R}/dev/d1/{leaf}", b"own") == 0
    ctl.wait(lambda: ctl.got(f"{R}/dev/d1/ack", b"own"))  # the last one: all before it are in
    assert ctl.got(f"{R}/dev/d1/telemetry", b"own") and ctl.got(f"{R}/dev/d1/state", b"own")
    assert not [t for t, p in ctl.msgs if p == b"forged"]
    assert d1.pub(f"{R}/art/d1/req", b"own") in OK


def test_device_reads_only_its_own_desired_and_cannot_write_it(peer, broker):
    ctl, d1 = peer("controller"), peer("d1")
    for dev in ("d1", "d2"):
        assert ctl.pub(f"{R}/dev/{dev}/desired", f"desired-{dev}".encode(), retain=True) in OK
    print("SUBACK for d1 on d2's desired, dev/+/desired, ctl/#:",
          d1.sub(f"{R}/dev/d2/desired", f"{R}/dev/+/desired", f"{R}/ctl/#"))
    assert ctl.pub(f"{R}/ctl/keys", b"sentinel") in OK  # ctl/# is readable by devices
    d1.wait(lambda: d1.got(f"{R}/ctl/keys"))
    assert [(t, p) for t, p in d1.msgs if "/desired" in t] == [(f"{R}/dev/d1/desired",
                                                                b"desired-d1")]
    assert d1.pub(f"{R}/dev/d1/desired", b"forged", retain=True) == NOT_AUTHORIZED
    assert d1.pub(f"{R}/dev/d2/desired", b"forged", retain=True) == NOT_AUTHORIZED
    fresh = peer("ops1")  # an operator login: the controller's rights, its own session
    fresh.sub(f"{R}/dev/+/desired")
    fresh.wait(lambda: len([t for t, _ in fresh.msgs if t.endswith("/desired")]) >= 2)
    assert sorted(fresh.msgs) == [(f"{R}/dev/d1/desired", b"desired-d1"),
                                  (f"{R}/dev/d2/desired", b"desired-d2")]


def test_device_cannot_use_controller_topics_or_others_artifacts(peer):
    ctl, d1 = peer("controller"), peer("d1")
    assert d1.pub(f"{R}/ctl/state", b"forged") == NOT_AUTHORIZED
    assert d1.pub(f"{R}/bcast/rebirth", b"forged") == NOT_AUTHORIZED
    print("SUBACK for d1 on art/d2/data, art/+/data:",
          d1.sub(f"{R}/art/d2/data", f"{R}/art/+/data"))
    assert ctl.pub(f"{R}/art/d2/data", b"secret") in OK
    assert ctl.pub(f"{R}/art/d1/data", b"mine") in OK
    d1.wait(lambda: d1.got(f"{R}/art/d1/data"))
    assert not d1.got(f"{R}/art/d2/data")


def test_a_login_cannot_take_over_another_clients_session(peer, broker):
    """Client IDs are usernames: d1 logging in with d2's (or the controller's) client ID, again
    and again, leaves d2's and the controller's connections alone."""
    ctl, d2 = peer("controller"), peer("d2")
    for client_id in ["d2", d2.c._client_id.decode(), "controller", ctl.c._client_id.decode()]:
        for _ in range(5):
            rc = connack(broker.host, broker.port, "d1", broker.creds["d1"], client_id=client_id)
            assert rc is not None and not rc.is_failure, rc
    assert d2.pub(f"{R}/dev/d2/telemetry", b"still here") in OK  # a round trip after the tries
    assert ctl.pub(f"{R}/dev/d2/desired", b"still here") in OK
    assert (len(d2.connected), d2.disconnected) == (1, [])
    assert (len(ctl.connected), ctl.disconnected) == (1, [])


def test_the_broker_runs_hardened_and_drops_oversized_messages(peer, broker):
    """The generated mosquitto.conf starts (the fixture's broker runs on it) with its limits,
    and a publish larger than the protocol's largest message is not delivered."""
    conf = broker.conf.read_text()
    for line in ["use_username_as_clientid true", f"message_size_limit {MAX_MESSAGE_BYTES}",
                 f"max_queued_bytes {MAX_QUEUED_BYTES}", f"memory_limit {MEMORY_LIMIT}",
                 "max_connections "]:
        assert f"\n{line}" in conf, line
    assert broker.proc.poll() is None
    ctl, big, d1 = peer("controller"), peer("ops1"), peer("d1")
    assert d1.sub(f"{R}/art/d1/data") == [1]
    big.c.publish(f"{R}/art/d1/data", b"x" * (MAX_MESSAGE_BYTES + 1), qos=1)
    big.wait(lambda: big.disconnected)  # Mosquitto 2.0 drops an MQTT 5 sender of one
    big.close()
    assert ctl.pub(f"{R}/art/d1/data", b"y" * MAX_MESSAGE_BYTES) in OK
    d1.wait(lambda: d1.got(f"{R}/art/d1/data"))
    assert [len(p) for p in d1.got(f"{R}/art/d1/data")] == [MAX_MESSAGE_BYTES]


def test_add_devices_reloads_passwords(broker):
    old = dict(broker.creds)
    broker.add_devices(["d3"])
    assert not connack(broker.host, broker.port, "d3", broker.creds["d3"]).is_failure
    assert not connack(broker.host, broker.port, "d1", old["d1"]).is_failure
    assert Credentials.load(broker.workdir / "credentials.json") == Credentials(old | {
        "d3": broker.creds["d3"]})


def test_tls_listener(broker):
    ca = broker.tls_files.cafile
    rc = connack(broker.host, broker.tls_port, "d2", broker.creds["d2"], ca_certs=ca)
    assert rc is not None and not rc.is_failure
    rc = connack(broker.host, broker.tls_port, "d2", "wrong", ca_certs=ca)
    assert rc is not None and rc.value == NOT_AUTHORIZED
    assert not connack(broker.host, broker.port, "d2", broker.creds["d2"]).is_failure


def test_fleet_clients_speak_tls_through_the_client_host(broker):
    """A device on the TLS port (make_client(tls_ca=...) driven by ClientHost's epoll loop)
    gets what the controller publishes on the plain port."""
    host, got, subscribed = ClientHost(), [], []
    dev = make_client("d1-tls", username="d1", password=broker.creds["d1"],
                      tls_ca=broker.tls_files.cafile)
    dev.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{R}/dev/d1/desired", qos=1)
    dev.on_subscribe = lambda c, u, mid, rcs, p: subscribed.append(mid)
    dev.on_message = lambda c, u, m: got.append(m.payload)
    ctl = make_client("ctl-plain", username="controller", password=broker.creds["controller"])
    try:
        host.add(dev, broker.host, broker.tls_port)
        host.add(ctl, broker.host, broker.port)
        host.run(until=lambda: subscribed and ctl.is_connected(), timeout=10)
        assert subscribed and ctl.is_connected()
        ctl.publish(f"{R}/dev/d1/desired", b"over tls", qos=1)
        host.run(until=lambda: b"over tls" in got, timeout=10)  # after any retained one
        assert b"over tls" in got
    finally:
        host.close()


def test_cli_config(tmp_path, capsys):
    out = tmp_path / "conf"
    assert broker_main(["config", "--out", str(out), "--devices", "a,b"]) == 0
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in capsys.readouterr().out
    modes = {n: (out / n).stat().st_mode & 0o777
             for n in ("mosquitto.conf", "passwd", "acl", "credentials.json")}
    assert modes == {"mosquitto.conf": 0o644, "passwd": 0o640, "acl": 0o640,
                     "credentials.json": 0o600}
    assert (out / "data").is_dir()
    first = Credentials.load(out / "credentials.json")
    ids = tmp_path / "ids"
    ids.write_text("c\n\n# comment\n")
    assert broker_main(["config", "--out", str(out), "--devices", "a,b",
                        "--devices-file", str(ids)]) == 0
    second = Credentials.load(out / "credentials.json")
    assert second.keys() == {"controller", "a", "b", "c"} and second["a"] == first["a"]
    assert len((out / "passwd").read_text().splitlines()) == 4
    assert "pattern read fleet/v1/dev/%u/desired" in (out / "acl").read_text()
    assert broker_main(["config", "--out", str(out), "--devices", "a,b",
                        "--operators", "monitor"]) == 0
    assert "user monitor\ntopic readwrite fleet/v1/#" in (out / "acl").read_text()


@pytest.mark.parametrize("args, message", [
    (["--devices", "a/b"], "device ID 'a/b'"),
    (["--devices", "a", "--tls-ca", "ca.pem"], "all three or none"),
    (["--devices", "controller"], "controller"),
    (["--devices", "a,mon", "--operators", "mon"], "operator"),
    (["--root", "fleet/#"], "topic root"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        broker_main(["config", "--out", str(tmp_path / "conf"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
