"""Mosquitto configuration for a fleet: per-device credentials, `%u` ACLs, listeners (DESIGN §4).

Every device logs in with its device ID as username; the ACL file confines it to its own topics.
The controller (username `controller`) and any *operator* logins (tools, monitors, a bench's
extra connections) may read and write the whole topic root. With logins on, the broker uses the
username as the client ID, so one login cannot take over another's session: every connection
that must stay up at the same time needs a login of its own. Stdlib and the protocol's limits.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fleet_protocol.files import write_file
from fleet_protocol.messages import MAX_MESSAGE_BYTES
from fleet_protocol.topics import Topics, check_id

CONTROLLER = "controller"
BROKER_USER = "mosquitto"  # the user a Mosquitto started as root switches to
SALT_BYTES = 12  # what mosquitto_passwd uses
FLEET_TOPICS = Topics()
# Broker limits (see `broker_conf` for why each is what it is)
PACKET_OVERHEAD = 4096  # fixed header, topic (root + 128-byte ID) and MQTT 5 properties
MAX_QUEUED_BYTES = 16 * 1024 * 1024
MAX_QUEUED_MESSAGES = 10_000
MEMORY_LIMIT = 1024 * 1024 * 1024
MAX_CONNECTIONS = 10_000


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2.x password hash: `$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>`."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def check_username(name: str, what: str = "username") -> str:
    """A device ID (`check_id`) that also fits Mosquitto's `user:hash` password file."""
    check_id(name, what)
    if ":" in name or name != name.strip():
        raise ValueError(f"{what} {name!r} may not contain ':' or surrounding whitespace")
    return name


@dataclass
class Credentials(Mapping[str, str]):
    """Username → plaintext password, kept for provisioning devices and the controller."""

    passwords: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.passwords:
            check_username(name)

    def __getitem__(self, name: str) -> str:
        return self.passwords[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.passwords)

    def __len__(self) -> int:
        return len(self.passwords)

    def generate(self, users: Iterable[str]) -> list[str]:
        """Give every user without a password a fresh one; return the users added (in order)."""
        users = [check_username(u) for u in users]
        added = [u for u in dict.fromkeys(users) if u not in self.passwords]
        for user in added:
            self.passwords[user] = secrets.token_urlsafe(18)
        return added

    def save(self, path: Path) -> None:
        """Write as JSON, mode 0600, atomically."""
        _write(Path(path), json.dumps(self.passwords, indent=2, sort_keys=True) + "\n", 0o600)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read a file written by `save`."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object of username → password")
        return cls(dict(data))

    def passwd_text(self) -> str:
        """Mosquitto's password file: one `user:$7$...` line per user (fresh salts)."""
        return "".join(f"{u}:{hash_password(p)}\n" for u, p in sorted(self.passwords.items()))


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA that signed the server certificate, cert and key."""

    cafile: Path
    certfile: Path
    keyfile: Path


def acl_text(topics: Topics, operators: Iterable[str] = ()) -> str:
    """The ACL file: the controller and `operators` read and write everything under the root;
    a device (username = device ID, `%u`) writes only its own uplink and reads only its own
    downlink."""
    r = topics.root
    admins = [CONTROLLER, *(check_username(o, "operator") for o in operators)]
    lines = [
        "# Written by restnet (fleet_runtime.brokerconf). The controller and the operator",
        f"# logins may use the whole topic root {r}/; every other user is a device whose",
        "# username is its device ID, and the `pattern` lines (%u = username) confine it to",
        "# its own topics. Anything not granted here is denied: publishes get PUBACK 135,",
        "# subscriptions deliver nothing.",
    ]
    for admin in dict.fromkeys(admins):
        lines += [f"user {admin}", f"topic readwrite {r}/#"]
    return "\n".join([
        *lines,
        "",
        f"pattern write {r}/dev/%u/telemetry",
        f"pattern write {r}/dev/%u/state",
        f"pattern write {r}/dev/%u/ack",
        f"pattern write {r}/art/%u/req",
        f"pattern read {r}/dev/%u/desired",
        f"pattern read {r}/art/%u/data",
        f"pattern read {r}/ctl/#",
        f"pattern read {r}/bcast/#",
    ]) + "\n"


def broker_conf(*, port: int, bind: str = "127.0.0.1", data_dir: Path,
                password_file: Path | None, acl_file: Path | None,
                tls: TlsFiles | None = None, tls_port: int | None = None,
                user_line: str = "") -> str:
    """mosquitto.conf text; without a password file anonymous clients are allowed (tests).
    With one, the client ID of every connection is its username (no session takeover)."""
    if tls is not None and tls_port is None:
        raise ValueError("a TLS listener needs tls_port")
    lines = [
        "# Written by restnet (fleet_runtime.brokerconf).",
        "per_listener_settings false",
        f"listener {port} {bind}",
        f"allow_anonymous {'false' if password_file else 'true'}",
    ]
    if password_file:
        lines += [
            f"password_file {password_file}",
            "# A client's ID is its username, whatever it sends: a device that logs in with",
            "# another device's (or the controller's) client ID cannot disconnect it.",
            "use_username_as_clientid true",
        ]
    if acl_file:
        lines.append(f"acl_file {acl_file}")
    lines += [
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 5",
        "set_tcp_nodelay true",
        "# The protocol's largest message (fleet_protocol.messages.MAX_MESSAGE_BYTES: a signed",
        "# desired state, or an artifact chunk of up to 128 KiB in base64); receivers refuse",
        "# anything larger anyway, so the broker need not route or store it (Mosquitto 2.0",
        "# disconnects an MQTT 5 client that sends one).",
        f"message_size_limit {MAX_MESSAGE_BYTES}",
        "# That payload plus its fixed header, topic and MQTT 5 properties.",
        f"max_packet_size {MAX_MESSAGE_BYTES + PACKET_OVERHEAD}",
        "# Per client, the QoS 1 messages held while it is offline or slow. Bytes bound the",
        "# broker's memory per client (one slow consumer once took it from 39 to 247 MB);",
        "# 16 MiB is ~180 artifact chunks of 64 KiB. A device that falls further behind loses",
        "# chunks and asks for them again (resumable fetch), and its desired state is retained.",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "max_inflight_messages 20",
        "# A hard ceiling on the broker's heap: past it, the message being handled is dropped",
        "# and that client is disconnected, instead of the host swapping or the OOM killer",
        "# taking the broker (and with it every device) down.",
        f"memory_limit {MEMORY_LIMIT}",
        "# The fleet's devices plus the controller and operators, with room to spare; a flood",
        "# of connections cannot exhaust file descriptors.",
        f"max_connections {MAX_CONNECTIONS}",
        "log_dest stdout",
    ]
    if tls is not None:
        lines += [f"listener {tls_port} {bind}", f"cafile {tls.cafile}",
                  f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                  "# the minimum version: TLS 1.3 is accepted too",
                  "tls_version tlsv1.2"]
    if user_line:
        lines.append(user_line)
    return "\n".join(lines) + "\n"


def write_broker_config(out_dir: Path, devices: Iterable[str], *, topics: Topics = FLEET_TOPICS,
                        port: int = 1883, bind: str = "0.0.0.0", tls: TlsFiles | None = None,
                        tls_port: int = 8883, extra_conf: str = "",
                        operators: Iterable[str] = ()) -> Credentials:
    """Write mosquitto.conf, passwd (0640), acl and credentials.json (0600) into `out_dir`
    and create `out_dir/data/`. Users already in credentials.json keep their passwords.
    `operators` get logins with the controller's rights (the ACL lists exactly these).
    Run as root, the files the broker reads are handed to the `mosquitto` group (and data/
    to the user) that Mosquitto switches to. `extra_conf` is appended to mosquitto.conf."""
    devices = [check_username(d, "device ID") for d in devices]
    operators = [check_username(o, "operator") for o in operators]
    for name in devices:
        if name == CONTROLLER or name in operators:
            raise ValueError(f"{name!r} is the controller's or an operator's username, "
                             "not a device ID")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cred_file = out / "credentials.json"
    creds = Credentials.load(cred_file) if cred_file.exists() else Credentials()
    creds.generate([CONTROLLER, *operators, *devices])
    creds.save(cred_file)
    write_passwd(out / "passwd", creds)
    write_acl(out / "acl", topics, operators)
    data = out / "data"
    data.mkdir(exist_ok=True)
    ids = _broker_ids()
    if ids:
        os.chown(data, *ids)
    conf = broker_conf(port=port, bind=bind, data_dir=data, password_file=out / "passwd",
                       acl_file=out / "acl", tls=tls, tls_port=tls_port if tls else None)
    _write(out / "mosquitto.conf", conf + extra_conf, 0o644)
    return creds


def write_acl(path: Path, topics: Topics, operators: Iterable[str] = ()) -> None:
    """Atomically (re)write the ACL file (`acl_text`), mode 0640."""
    _write(Path(path), acl_text(topics, operators), 0o640, broker_readable=True)


def write_passwd(path: Path, creds: Credentials) -> None:
    """Atomically (re)write Mosquitto's password file for `creds`, mode 0640."""
    _write(Path(path), creds.passwd_text(), 0o640, broker_readable=True)


def _broker_ids() -> tuple[int, int] | None:
    """(uid, gid) of the user Mosquitto drops to, when we are root and it exists."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam(BROKER_USER)
        return user.pw_uid, user.pw_gid
    except KeyError:
        return None


def _write(path: Path, text: str, mode: int, *, broker_readable: bool = False) -> None:
    """Write `text` crash-safely with `mode`; readable by the broker's group if asked."""
    ids = _broker_ids() if broker_readable else None
    write_file(path, text.encode(), mode, ids[1] if ids else None)
