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
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = Path("/usr/sbin/mosquitto")
BROKER_USER = "mosquitto"


@dataclass
class Broker:
    """A running Mosquitto process started by `start_broker`."""

    host: str
    port: int
    workdir: Path
    proc: subprocess.Popen
    timeout: float = 10.0

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


def start_broker(workdir: Path, *, port: int | None = None, extra_conf: str = "",
                 timeout: float = 10.0) -> Broker:
    """Write `workdir/mosquitto.conf`, start Mosquitto on it and wait until it accepts connections."""
    if not MOSQUITTO.exists():
        raise FileNotFoundError(f"{MOSQUITTO} not found: apt-get install mosquitto")
    workdir = Path(workdir).resolve()
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(_config(port, data, _privileges(data)) + extra_conf + "\n")
    proc = _launch(conf, workdir / "mosquitto.log", "127.0.0.1", port, timeout)
    return Broker("127.0.0.1", port, workdir, proc, timeout)


def _config(port: int, data: Path, user_line: str) -> str:
    return "\n".join([
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {data}/",
        "autosave_interval 5",
        "set_tcp_nodelay true",
        "max_packet_size 1048576",
        "max_queued_messages 10000",
        "max_inflight_messages 20",
        "log_dest stdout",
        user_line,
    ]) + "\n"


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
