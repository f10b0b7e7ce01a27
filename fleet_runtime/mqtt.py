"""MQTT client factory and `ClientHost`, which drives many paho clients in one thread.

paho's own loop thread watches its socket with `select()`, which silently stops working past
~339 clients in one process (file descriptors >= 1024). `ClientHost` instead registers every
client's socket with one `selectors` (epoll) selector through paho's external-loop hooks, runs
timers, and reconnects lost clients with jittered exponential back-off (paho adds no jitter).
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import random
import selectors
import signal
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from paho.mqtt.client import Client, MQTTv5
from paho.mqtt.enums import CallbackAPIVersion

logger = logging.getLogger(__name__)

DEFAULT_PORT = 1883
URL_FORM = "mqtt://host[:port]"
MISC_PERIOD = 1.0  # seconds between loop_misc() passes (keepalive pings)
# packets read from one socket per readiness event: paho's loop_read() reads ONE packet, so a
# client that floods a shared connection would otherwise stay ahead of everything behind it
READ_BURST = 256


def parse_url(url: str) -> tuple[str, int]:
    """Split `mqtt://host[:port]` into (host, port); the port defaults to 1883."""
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORT
    except ValueError as err:
        raise ValueError(f"bad broker URL {url!r}: expected {URL_FORM}") from err
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ValueError(f"bad broker URL {url!r}: expected {URL_FORM}")
    return parts.hostname, port


def make_client(client_id: str, *, will: tuple[str, bytes] | None = None,
                username: str | None = None, password: str | None = None,
                tls_ca: Path | None = None) -> Client:
    """A paho 2.x MQTTv5 client; the optional will (topic, payload) is retained, QoS 1. With
    `tls_ca` it speaks TLS and checks the broker's certificate against that CA."""
    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv5)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    if username is not None:
        client.username_pw_set(username, password)
    if tls_ca is not None:
        client.tls_set(ca_certs=str(tls_ca))
    return client


class Backoff:
    """Exponential back-off with full jitter (paho adds none): delay = uniform(0, min(cap, base * 2**attempt))."""

    def __init__(self, base: float = 0.5, cap: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call doubles the ceiling up to `cap`."""
        ceiling = min(self.cap, self.base * 2 ** min(self._attempt, 62))
        self._attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0


@dataclass
class _Entry:
    """What the host knows about one client."""

    backoff: Backoff
    connected: bool = False   # CONNACK seen on the current socket
    ever_connected: bool = False
    retrying: bool = False    # a reconnect timer is pending
    removed: bool = False


class ClientHost:
    """Drives many paho clients in ONE thread with a selectors/epoll loop (paho's own loop uses select(), which silently fails past ~339 clients)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[Client, _Entry] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._queue: deque[Callable[[], None]] = deque()
        self._stop = threading.Event()
        self._owner: int | None = None  # ident of the thread running the loop
        self._next_misc = 0.0
        self.stats: dict[str, int] = dict(connects=0, reconnects=0, disconnects=0,
                                          connect_failures=0)

    # ---- clients -------------------------------------------------------------------------
    def add(self, client: Client, host: str, port: int, keepalive: int = 30, *,
            backoff: Backoff | None = None) -> None:
        """Connect `client` (TCP connect + CONNECT) and drive it; a refused connect is retried."""
        if not self._in_loop():
            self.submit(lambda: self.add(client, host, port, keepalive, backoff=backoff))
            return
        entry = _Entry(backoff or Backoff())
        self._clients[client] = entry
        client.suppress_exceptions = True  # a raising callback would corrupt paho's read state
        if client.logger is None:
            client.enable_logger(logger.getChild("paho"))
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        try:
            client.connect(host, port, keepalive, clean_start=True)
        except OSError as err:
            logger.debug("connect %s to %s:%s failed: %s", client, host, port, err)
            self.stats["connect_failures"] += 1
            self._schedule_reconnect(client, entry)
        except Exception:
            del self._clients[client]
            raise

    def remove(self, client: Client) -> None:
        """Disconnect `client` cleanly (no will) and forget it."""
        if not self._in_loop():
            self.submit(lambda: self.remove(client))
            return
        entry = self._clients.get(client)
        if entry is None:
            return
        entry.removed = True
        if client.socket() is None:
            del self._clients[client]
        else:
            client.disconnect()  # forgotten once paho has sent DISCONNECT and closed the socket

    # ---- timers and cross-thread calls ---------------------------------------------------
    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` in the loop thread after `delay` seconds."""
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
        if not self._in_loop():
            self._wake()

    def every(self, period: float, fn: Callable[[], None], *, jitter: float = 0.0) -> None:
        """Run `fn` every `period` seconds; with jitter j in [0, 1] the first call comes after
        period * (1 - j * U(0, 1)), which spreads many devices' ticks over the period."""
        def tick(due: float) -> None:
            now = time.monotonic()
            nxt = due + period if due + period > now else now + period
            self.call_later(nxt - now, lambda: tick(nxt))
            fn()

        first = period * (1.0 - jitter * random.random())
        due = time.monotonic() + first
        self.call_later(first, lambda: tick(due))

    def submit(self, fn: Callable[[], None]) -> None:
        """Thread-safe: run `fn` in the loop thread soon."""
        self._queue.append(fn)
        if not self._in_loop():
            self._wake()

    # ---- the loop ------------------------------------------------------------------------
    def run_once(self, max_wait: float = 0.05) -> None:
        """One poll: socket events, submitted calls, due timers, keepalive housekeeping."""
        self._owner = threading.get_ident()
        now = time.monotonic()
        wait = min(max_wait, self._next_misc - now)
        with self._lock:
            if self._timers:
                wait = min(wait, self._timers[0][0] - now)
        if self._queue:
            wait = 0.0
        for key, mask in self._sel.select(max(wait, 0.0)):
            if key.data is None:
                self._drain_wake()
            else:
                self._service(key.data, key.fileobj, mask)
        for _ in range(len(self._queue)):
            self._guard("submitted call", self._queue.popleft())
        self._run_timers()
        if time.monotonic() >= self._next_misc:
            self._next_misc = time.monotonic() + MISC_PERIOD
            self._misc()

    def run(self, *, until: Callable[[], bool] | None = None,
            timeout: float | None = None) -> None:
        """Loop until `until()` is true, `timeout` seconds pass, or `stop()` is called."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.is_set():
            if until is not None and until():
                return
            wait = 0.05
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
            self.run_once(min(wait, 0.05))
        self._stop.clear()

    def stop(self) -> None:
        """Thread-safe: make `run()` return."""
        self._stop.set()
        self._wake()

    def close(self) -> None:
        """Release the selector and the wake-up socket pair (clients are left as they are)."""
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ---- internals -----------------------------------------------------------------------
    def _in_loop(self) -> bool:
        return self._owner is None or self._owner == threading.get_ident()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            logger.exception("%s raised; the loop goes on", what)

    def _service(self, client: Client, sock: object, mask: int) -> None:
        """Read/write one client's socket, then notice connects and losses."""
        if client.socket() is not sock:
            return  # stale event: closed or replaced earlier in this pass
        if mask & selectors.EVENT_READ:
            for _ in range(READ_BURST):
                self._guard(f"loop_read of {client}", client.loop_read)
                if client.socket() is not sock or not _readable(sock):
                    break
        if mask & selectors.EVENT_WRITE and client.socket() is sock:
            self._guard(f"loop_write of {client}", client.loop_write)
        self._check(client)

    def _check(self, client: Client) -> None:
        entry = self._clients.get(client)
        if entry is None:
            return
        if client.socket() is None:
            if entry.removed:
                del self._clients[client]
            elif not entry.retrying:
                if entry.connected:
                    self.stats["disconnects"] += 1
                    logger.debug("%s lost its connection", client)
                else:
                    self.stats["connect_failures"] += 1
                entry.connected = False
                self._schedule_reconnect(client, entry)
        elif not entry.connected and client.is_connected():
            entry.connected = True
            entry.backoff.reset()
            self.stats["connects"] += 1
            if entry.ever_connected:
                self.stats["reconnects"] += 1
            entry.ever_connected = True

    def _schedule_reconnect(self, client: Client, entry: _Entry) -> None:
        entry.retrying = True
        self.call_later(entry.backoff.next_delay(), lambda: self._reconnect(client, entry))

    def _reconnect(self, client: Client, entry: _Entry) -> None:
        entry.retrying = False
        if entry.removed or self._clients.get(client) is not entry or client.socket() is not None:
            return
        try:
            client.reconnect()
        except Exception as err:
            logger.debug("reconnect of %s failed: %s", client, err)
            self.stats["connect_failures"] += 1
            self._schedule_reconnect(client, entry)

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for fn in due:
            self._guard("timer", fn)

    def _misc(self) -> None:
        """Keepalive pings and timeouts; also flush anything a cross-thread publish left queued."""
        for client in list(self._clients):
            if client.socket() is not None:
                self._guard(f"loop_misc of {client}", client.loop_misc)
                if client.socket() is not None and client.want_write():
                    self._guard(f"loop_write of {client}", client.loop_write)
            self._check(client)

    # paho's external-loop hooks; they may fire in any thread, the selector changes only here
    def _on_socket_open(self, client: Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop_do(lambda: self._register(client, sock, selectors.EVENT_READ))

    def _on_socket_close(self, client: Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop_do(lambda: self._unregister(sock))

    def _on_register_write(self, client: Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop_do(lambda: self._register(
            client, sock, selectors.EVENT_READ | selectors.EVENT_WRITE))

    def _on_unregister_write(self, client: Client, userdata: object, sock: socket.socket) -> None:
        self._in_loop_do(lambda: self._register(client, sock, selectors.EVENT_READ))

    def _in_loop_do(self, fn: Callable[[], None]) -> None:
        if self._in_loop():
            fn()
        else:
            self.submit(fn)

    def _register(self, client: Client, sock: socket.socket, events: int) -> None:
        if client.socket() is not sock:
            return  # closed before a queued registration ran
        key = self._sel.get_map().get(sock)
        if key is not None and key.fileobj is not sock:  # a closed socket's fd, reused
            self._unregister(key.fileobj)
            key = None
        if key is None:
            self._sel.register(sock, events, client)
        else:
            self._sel.modify(sock, events, client)

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass  # never registered, or already gone


def _readable(sock: object) -> bool:
    """Whether bytes wait on `sock` (decrypted ones, for TLS) without blocking."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.pending() > 0
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # let loop_read meet the error and report it


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """The broker and logging options every long-running `restnet` process takes."""
    p.add_argument("--broker", default=f"mqtt://127.0.0.1:{DEFAULT_PORT}", help=URL_FORM)
    p.add_argument("--username", help="broker user (a device's user is its device ID)")
    p.add_argument("--password-file", type=Path,
                   help="file holding the broker password (kept off the command line)")
    p.add_argument("--tls-ca", type=Path,
                   help="connect with TLS, checking the broker against this CA certificate")
    p.add_argument("-v", "--verbose", action="store_true")


def login(args: argparse.Namespace) -> dict:
    """`make_client`'s username, password and tls_ca from the options of
    `add_connection_args`."""
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as exc:
            raise SystemExit(f"cannot read --password-file: {exc}") from None
    if args.tls_ca is not None and not args.tls_ca.is_file():
        raise SystemExit(f"--tls-ca {args.tls_ca}: no such file")
    return {"username": args.username, "password": password, "tls_ca": args.tls_ca}


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def serve_metrics(prog: str, port: int, registry) -> None:
    """Expose a prometheus_client `registry` on 127.0.0.1:`port` (0: off); SystemExit naming
    the flag when the port cannot be bound."""
    if not port:
        return
    from prometheus_client import start_http_server
    try:
        start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as exc:
        raise SystemExit(f"{prog}: --metrics-port {port}: {exc}") from exc


def serve(host: ClientHost, on_exit: Callable[[], None]) -> None:
    """Run `host` in this thread until SIGTERM or Ctrl-C, then `on_exit()` and a last flush
    (how a board's agent and a controller process run)."""
    signal.signal(signal.SIGTERM, lambda *_: host.stop())
    try:
        host.run()
    except KeyboardInterrupt:
        pass
    on_exit()
    host.run(timeout=1.0)


def run_in_thread(host: ClientHost, name: str = "mqtt-host") -> threading.Thread:
    """Run `host.run()` on a daemon thread; from then on other threads' calls are queued to it."""
    thread = threading.Thread(target=host.run, name=name, daemon=True)
    thread.start()
    host._owner = thread.ident  # before returning, so callers never race the first run_once
    return thread
