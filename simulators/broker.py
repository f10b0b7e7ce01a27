"""A private Mosquitto broker on a free loopback port, for tests and demos."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from paho.mqtt.reasoncodes import ReasonCode

from fleet_runtime.brokerconf import (BROKER_USER, FLEET_TOPICS, Credentials, TlsFiles,
                                       broker_conf, write_acl, write_broker_config, write_passwd)
from fleet_runtime.mqtt import make_client

MOSQUITTO = Path("/usr/sbin/mosquitto")


@dataclass
class Broker:
    """A running Mosquitto process started by `start_broker`."""

    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen
    timeout: float = 10.0
    creds: Credentials | None = None  # None when started with auth=False
    tls_port: int | None = None
    operators: list[str] = field(default_factory=list)  # logins with the controller's rights

    @property
    def url(self) -> str:
        """The broker's address as `mqtt://host:port`."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def add_devices(self, ids: Iterable[str]) -> None:
        """Give devices `ids` logins (old passwords stay), reload the broker with SIGHUP and
        wait until the newest user can log in (bounded by `timeout`)."""
        self._add_logins(list(ids))

    def add_operators(self, names: Iterable[str]) -> None:
        """Give `names` logins with the controller's rights (a test's spy, a bench's extra
        connection: client IDs are usernames, so each needs its own) and reload the broker."""
        names = [n for n in names if n not in self.operators]
        self.operators += names
        self._add_logins(names)

    def _add_logins(self, ids: list[str]) -> None:
        if self.creds is None:
            raise RuntimeError("adding logins needs a broker started with auth=True")
        if not ids:
            return
        self.creds.generate(ids)
        self.creds.save(self.workdir / "credentials.json")
        write_passwd(self.workdir / "passwd", self.creds)
        write_acl(self.workdir / "acl", FLEET_TOPICS, self.operators)
        self.proc.send_signal(signal.SIGHUP)
        newest = ids[-1]
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            rc = connack(self.host, self.port, newest, self.creds[newest], timeout=max(left, 0.1))
            if rc is not None and not rc.is_failure:
                return
            if time.monotonic() >= deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{newest!r} still cannot log in after SIGHUP (last CONNACK "
                                   f"{rc}); see {self.log}")
            time.sleep(0.02)  # between login attempts

    def stop(self) -> None:
        """SIGTERM and wait (the broker saves its persistence file); idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no persistence save, clients see their sockets drop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """Stop if running, then start again on the same port, config and persistence."""
        self.stop()
        self.proc = _launch(self.conf, self.log, self.host, self.port, self.timeout)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path, *, port: int | None = None, devices: Iterable[str] = (),
                 auth: bool = True, extra_conf: str = "", tls: TlsFiles | None = None,
                 tls_port: int | None = None, timeout: float = 10.0,
                 operators: Iterable[str] = ()) -> Broker:
    """Write `workdir/mosquitto.conf`, start Mosquitto on it and wait until it accepts connections.

    auth=True (the default): logins for `controller` and every device in `devices`
    (`Broker.creds`; passwd, acl, credentials.json in `workdir`; `add_devices` adds more) with
    the fleet ACLs of `fleet_runtime.brokerconf`, and for `operators` (logins with the
    controller's rights; `add_operators` adds more). auth=False: anonymous clients, no ACLs.
    `tls` adds a TLS listener on `tls_port` (default: a free port).
    """
    if not MOSQUITTO.exists():
        raise FileNotFoundError(f"{MOSQUITTO} not found: apt-get install mosquitto")
    workdir = Path(workdir).resolve()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    tls_port = (tls_port or free_port()) if tls else None
    conf = workdir / "mosquitto.conf"
    user_line = _privileges(data)
    creds = None
    operators = list(operators)
    if auth:
        extra = "".join(f"{line}\n" for line in (user_line, extra_conf) if line)
        creds = write_broker_config(workdir, devices, port=port, bind="127.0.0.1", tls=tls,
                                    tls_port=tls_port or 8883, extra_conf=extra,
                                    operators=operators)
    else:
        conf.write_text(broker_conf(port=port, data_dir=data, password_file=None, acl_file=None,
                                    tls=tls, tls_port=tls_port, user_line=user_line)
                        + extra_conf + "\n")
    proc = _launch(conf, workdir / "mosquitto.log", "127.0.0.1", port, timeout)
    return Broker("127.0.0.1", port, workdir, proc, timeout, creds, tls_port, operators)


def connack(host: str, port: int, username: str | None = None, password: str | None = None, *,
            ca_certs: Path | None = None, timeout: float = 5.0,
            client_id: str = "") -> ReasonCode | None:
    """Log in once (MQTT v5) and disconnect: the CONNACK reason code, or None if none came
    within `timeout` (connection refused, TLS failure, silence)."""
    client = make_client(client_id, username=username, password=password, tls_ca=ca_certs)
    got: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc)
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=10)
        while not got and time.monotonic() < deadline:
            if client.loop(timeout=min(0.1, max(deadline - time.monotonic(), 0.01))):
                break  # the socket closed
    except OSError:
        pass
    finally:
        client.disconnect()
        client.loop(timeout=0.01)
    return got[0] if got else None


def _privileges(data: Path) -> str:
    """Make `data` writable by the user the broker drops to; a `user` config line if needed.

    Run as root, Mosquitto switches to user `mosquitto`. The data directory is chowned to it, but
    when a parent directory is closed to that user (pytest's tmp_path lives under a 0700
    directory) the broker could not save its database, so it is told to stay root instead.
    """
    if os.geteuid() != 0:
        return ""
    try:
        user = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return "user root"
    shutil.chown(data, user=user.pw_uid, group=user.pw_gid)
    return "" if _traversable(data.parent, user.pw_uid, user.pw_gid) else "user root"


def _traversable(path: Path, uid: int, gid: int) -> bool:
    """Whether a process of uid/gid can search every directory from / down to `path`."""
    for d in [path, *path.parents]:
        st = d.stat()
        bit = (stat.S_IXUSR if st.st_uid == uid else stat.S_IXGRP if st.st_gid == gid
               else stat.S_IXOTH)
        if not st.st_mode & bit:
            return False
    return True


def _launch(conf: Path, log: Path, host: str, port: int, timeout: float) -> subprocess.Popen:
    """Start `mosquitto -c conf` with output appended to `log`; wait for the port to accept."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"mosquitto did not accept connections on {host}:{port} "
                       f"(exit code {proc.returncode}); log tail:\n{tail}")
