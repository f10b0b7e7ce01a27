"""The board's local inference API: HTTP/1.1 on localhost (a TCP port) or on a Unix socket,
for applications in any language (docs/protocol.md §"Local inference API").

    POST /v1/infer   a .npy file (Content-Type: application/x-npy), an image file (image/png,
                     ...), or JSON {"array": [...], "dtype": "uint8"|"float"} or
                     {"image": "<base64>" | [...]}
                     → 200 {"classes", "scores", "model", "name", "generation", "latency_ms",
                            "request_id"}
    POST /v1/feedback {"request_id": "<from an answer>", "labels": [class or null per image]}
                     → 200 {"request_id", "generation", "labelled", "correct"}
    GET  /v1/model   → 200 {"model", "name", "generation", "input": {"channels", "size", ...}}

Errors answer {"error": "<what to fix>"}: 400 unreadable input, 404 unknown path (or feedback
for an answer no longer held), 413 body too large, 503 no model yet or the queue is full (with
Retry-After), 500 the model failed.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import io
import json
import logging
import math
import os
import queue
import socket
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .infer_client import MAX_BODY, NPY
from .serving import MAX_PIXELS, BadInput, Serving, Unavailable, UnknownRequest

log = logging.getLogger(__name__)
MAX_FEEDBACK_BODY = 64 * 2**10  # bytes of one feedback request
MAX_CONNECTIONS = 64  # open at once; each holds a thread
_MAX_LINE, _MAX_HEADERS = 65536, 100  # a request's header line length and count (as the stdlib's)
_NPY_MAGIC = b"\x93NUMPY"
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def decode_body(content_type: str, raw: bytearray) -> np.ndarray:
    """The images of a request body of `content_type`, as an array `Serving.infer` takes: a
    .npy file, an image file, or else JSON (what `curl -d` sends too). Raises BadInput."""
    if content_type == NPY:
        return decode_npy(raw)
    if content_type.startswith("image/"):
        return _decode_image(raw)[None]
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"the body is not JSON ({exc}); send Content-Type: {NPY} for a .npy "
                       "array or image/png for an image file") from None
    return decode_images(body)


def decode_npy(raw: bytearray) -> np.ndarray:
    """The array of a .npy file (numpy's format 1.0 or 2.0, no pickled objects), on `raw`'s
    memory (no copy). Raises BadInput."""
    size = {1: 2, 2: 4}.get(raw[6]) if raw[:6] == _NPY_MAGIC and len(raw) > 8 else None
    if size is None:
        raise BadInput(f"the body is not a .npy array of format 1.0 or 2.0 (it begins "
                       f"{bytes(raw[:8])!r})")
    offset = 8 + size + int.from_bytes(raw[8:8 + size], "little")  # magic, version, header
    shape, fortran, dtype = _npy_header(bytes(raw[:offset]))
    count, data = math.prod(shape), len(raw) - offset
    if count * dtype.itemsize != data:
        raise BadInput(f".npy header says {shape} {dtype} ({count * dtype.itemsize} bytes), "
                       f"the body holds {data} bytes of data")
    x = np.frombuffer(raw, dtype, count, offset).reshape(shape, order="F" if fortran else "C")
    return x if dtype.isnative else x.astype(dtype.newbyteorder("="))


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of a .npy file's head, checked. An application sends the
    same few heads again and again, and parsing one costs more than the rest of a decode."""
    fp = io.BytesIO(head)
    try:
        read = (np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(fp) == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(fp)
    except Exception as exc:  # numpy's parser on an untrusted head: ValueError, TokenError...
        raise BadInput(f"the body is not a .npy array: {exc}") from None
    if dtype.hasobject or dtype.kind not in "uif":
        raise BadInput(f".npy dtype {dtype}: send uint8 (pixels 0–255) or float (0–1)")
    if min(shape, default=0) < 0:
        raise BadInput(f".npy shape {shape} has a negative size")
    return tuple(shape), fortran, dtype


def decode_images(body: Any) -> np.ndarray:
    """The images of a JSON request body, as an array `Serving.infer` takes. Raises BadInput."""
    if not isinstance(body, dict) or ("array" in body) == ("image" in body):
        raise BadInput('send a JSON object with either "array" (nested lists) or "image" '
                       '(base64 of a PNG, or a list of them)')
    if "array" in body:
        dtype = body.get("dtype")
        if dtype not in (None, "uint8", "float"):
            raise BadInput(f'"dtype" must be "uint8" (pixels 0–255) or "float" (0–1), '
                           f"not {dtype!r}")
        try:
            x = np.asarray(body["array"], dtype=np.float32 if dtype == "float" else None)
        except (ValueError, TypeError) as exc:
            raise BadInput(f'"array" is not a rectangular array of numbers: {exc}') from None
        if x.dtype.kind not in "iuf":
            raise BadInput(f'"array" must hold numbers, not {x.dtype}')
        if dtype == "uint8" or (dtype is None and x.dtype.kind in "iu"):
            if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
                raise BadInput('"dtype": "uint8" needs whole numbers')
            if x.size and (x.min() < 0 or x.max() > 255):
                raise BadInput("uint8 pixel values must lie in [0, 255]")
            return x.astype(np.uint8)
        return x.astype(np.float32)
    images = body["image"] if isinstance(body["image"], list) else [body["image"]]
    decoded = [_decode_image(_unbase64(b)) for b in images]
    if not decoded or len({a.shape for a in decoded}) != 1:
        raise BadInput("the images of one request must all have the same size and mode")
    return np.stack(decoded)


def _unbase64(text: Any) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise BadInput(f'"image" must be base64 of a PNG (or another image file): {exc}') \
            from None


def _decode_image(raw: bytes | bytearray) -> np.ndarray:
    """One image file (PNG, or any format Pillow reads) as H×W (grey) or H×W×3."""
    from PIL import Image  # only when an image file arrives

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:  # before it is decoded
                raise BadInput(f"an image of {img.width}×{img.height} pixels; at most "
                               f"{MAX_PIXELS} values per request")
            img = img.convert("L" if img.mode in _GREY_MODES else "RGB")
            return np.array(img)  # writable, as torch wants it
    except BadInput:
        raise
    except Exception as exc:  # Pillow on an untrusted file: OSError, SyntaxError, a bomb...
        raise BadInput(f"not an image file Pillow reads (PNG...): {exc}") from None


class _Headers(dict):
    """A request's headers, by lower-case name."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)

    def get_content_type(self) -> str:
        """The media type without parameters, lower case (text/plain when none is sent, as
        the standard library's `Message.get_content_type`)."""
        return self.get("content-type", "").partition(";")[0].strip().lower() or "text/plain"


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle connection is kept
    wbufsize = -1  # buffered: 100 Continue is flushed by hand, answers leave in one write
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        if self.request.family != socket.AF_UNIX:  # no Nagle: answers leave at once
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def parse_request(self) -> bool:
        """The request line and headers of HTTP/1.0 and 1.1, read without the standard
        library's email parser, which cost a third of the API's time per request. A request
        it cannot take is answered (400, 431 or 505, saying why) and its connection closed."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.1", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return self._refuse(400, f"not an HTTP request line: {self.requestline[:80]!r}")
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            return self._refuse(505, f"{words[2][:20]}: send HTTP/1.1 (or HTTP/1.0)")
        self.command, self.path, self.request_version = words
        self.headers = headers = _Headers()
        for _ in range(_MAX_HEADERS + 1):
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                return self._refuse(431, f"a header line is over {_MAX_LINE} bytes")
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = str(line, "iso-8859-1").partition(":")
            if not colon or not name or name != name.strip():  # RFC 9112: no space before ':'
                return self._refuse(400, f"not a header line: {line[:80]!r}")
            name = name.lower()
            if name == "content-length" and name in headers:
                return self._refuse(400, "send one Content-Length")
            headers[name] = value.strip()
        else:
            return self._refuse(431, f"over {_MAX_HEADERS} header lines")
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if (headers.get("expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def _refuse(self, status: int, why: str) -> bool:
        """Answer a request that cannot be read, close its connection; False."""
        self.close_connection = True
        self._reply(status, {"error": why})
        return False

    def handle_expect_100(self) -> bool:
        """`100 Continue` leaves at once (writes are buffered): the client waits for it
        before it sends its body (curl does for large ones)."""
        ok = super().handle_expect_100()
        self.wfile.flush()
        return ok

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("local API: " + format, *args)

    def _reply(self, status: int, doc: dict[str, Any], retry: bool = False) -> None:
        """The answer in one write, its head made directly (`send_response` and `send_header`
        cost as much as the rest of a small request)."""
        body = json.dumps(doc).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Date: {_http_date(int(time.time()))}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n")
        if retry:
            head += "Retry-After: 1\r\n"
        if self.close_connection:  # the client must not send the next request here
            head += "Connection: close\r\n"
        self.wfile.write(head.encode() + b"\r\n" + body)
        log.debug("local API: %s %s %d", self.command, self.path, status)

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        if self.path != "/v1/model":
            self._reply(404, {"error": f"no {self.path}: GET /v1/model, POST /v1/infer or "
                                       "/v1/feedback"})
            return
        cur = self.server.serving.slot.get()
        if cur is None:
            self._reply(503, {"error": "no model loaded yet"}, retry=True)
            return
        self._reply(200, {"model": cur.hybrid, "name": cur.desired.name,
                          "generation": cur.generation, "input": cur.input.to_meta()})

    def do_POST(self) -> None:  # noqa: N802 (stdlib's name)
        if self.path not in ("/v1/infer", "/v1/feedback"):
            self._reply(404, {"error": f"no {self.path}: POST /v1/infer or /v1/feedback, GET "
                                       "/v1/model"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, {"error": "send a Content-Length"})
            return
        if not 0 < length <= MAX_BODY:
            self.close_connection = True
            self._reply(413, {"error": f"a request body holds 1 to {MAX_BODY} bytes; "
                                       "send fewer images per request"})
            return
        raw = bytearray(length)  # writable: a .npy body's array is made on it, uncopied
        if self.rfile.readinto(raw) != length:
            self.close_connection = True
            self._reply(400, {"error": f"the body ended before its Content-Length ({length})"})
            return
        if self.path == "/v1/feedback":
            self._feedback(raw)
            return
        try:
            pred = self.server.serving.infer(decode_body(self.headers.get_content_type(), raw))
        except BadInput as exc:
            self._reply(400, {"error": str(exc)})
        except Unavailable as exc:
            self._reply(503, {"error": str(exc)}, retry=True)
        except Exception as exc:
            log.exception("local API: inference failed")
            self._reply(500, {"error": str(exc)})
        else:
            self._reply(200, pred.to_json())

    def _feedback(self, raw: bytearray) -> None:
        """POST /v1/feedback: the true classes of an earlier answer's images."""
        if len(raw) > MAX_FEEDBACK_BODY:
            self._reply(413, {"error": f"a feedback body holds at most {MAX_FEEDBACK_BODY} "
                                       "bytes"})
            return
        try:
            doc = self.server.serving.feedback(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._reply(400, {"error": f"the body is not JSON: {exc}"})
        except BadInput as exc:
            self._reply(400, {"error": str(exc)})
        except UnknownRequest as exc:
            self._reply(404, {"error": str(exc)})
        else:
            self._reply(200, doc)


class _Bounded:
    """At most `MAX_CONNECTIONS` connections at once, each served by a thread of a pool that
    keeps its threads for later connections (a new thread, and torch's thread team that its
    first forward pass starts, cost more than a small model's forward pass); more are
    answered 503 and closed at once. Idle keep-alive connections close after
    `_Handler.timeout`."""

    serving: Serving

    def start_pool(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._connections: queue.SimpleQueue = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._threads = self._idle = 0

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._pool_lock:
            if self._idle:
                self._idle -= 1
            else:
                self._threads += 1
                threading.Thread(target=self._serve_connections, name="local-api-conn",
                                 daemon=True).start()
        self._connections.put((request, client_address))

    def _serve_connections(self) -> None:
        while (job := self._connections.get()) is not None:
            try:
                self.finish_request(*job)
            except Exception:
                self.handle_error(*job)
            finally:
                self.shutdown_request(job[0])
                with self._pool_lock:  # idle before its slot is free: never one thread more
                    self._idle += 1
                self._slots.release()

    def stop_pool(self) -> None:
        """End the pool's threads: idle ones now, busy ones when their connection closes."""
        with self._pool_lock:
            for _ in range(self._threads):
                self._connections.put(None)
            self._threads = self._idle = 0


class _Server(_Bounded, HTTPServer):
    pass


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    def get_request(self):  # the handler expects a (host, port)-like client address
        sock, _ = super().get_request()
        return sock, ("unix", 0)


class LocalAPI:
    """The HTTP API over `serving`, on 127.0.0.1:`port` (0: any free port) or on the Unix
    socket `path`; `start()` serves from a thread, `stop()` closes it."""

    def __init__(self, serving: Serving, port: int | None = None,
                 path: Path | None = None) -> None:
        if (port is None) == (path is None):
            raise ValueError("give a TCP port or a Unix socket path, one of them")
        if path is not None:
            Path(path).unlink(missing_ok=True)  # a socket left by an earlier run
            self._server: _Server | _UnixServer = _UnixServer(str(path), _Handler)
            os.chmod(path, 0o660)  # the board's users in the agent's group
        else:
            self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.serving = serving
        self._server.start_pool()
        self._path = path
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The TCP port it listens on (None on a Unix socket)."""
        return None if self._path else self._server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.stop_pool()
        if self._path is not None:
            Path(self._path).unlink(missing_ok=True)
