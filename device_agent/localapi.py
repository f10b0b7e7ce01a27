"""The board's local inference API: HTTP/1.1 + JSON on localhost (a TCP port) or on a Unix
socket, for applications in any language (docs/protocol.md §"Local inference API").

    POST /v1/infer   {"array": [...], "dtype": "uint8"|"float"}  or  {"image": "<base64>" | [...]}
                     → 200 {"classes", "scores", "model", "name", "generation", "latency_ms"}
    GET  /v1/model   → 200 {"model", "name", "generation", "input": {"channels", "size", ...}}

Errors answer {"error": "<what to fix>"}: 400 unreadable input, 404 unknown path, 413 body too
large, 503 no model yet or the queue is full (with Retry-After), 500 the model failed.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .serving import BadInput, Serving, Unavailable

log = logging.getLogger(__name__)
MAX_BODY = 64 * 2**20  # bytes of one request
MAX_CONNECTIONS = 64  # open at once; each holds a thread
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def decode_images(body: Any) -> np.ndarray:
    """The images of a request body, as an array `Serving.infer` takes. Raises BadInput."""
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
    decoded = [_decode_image(b) for b in images]
    if not decoded or len({a.shape for a in decoded}) != 1:
        raise BadInput("the images of one request must all have the same size and mode")
    return np.stack(decoded)


def _decode_image(text: Any) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # only when an image file arrives

    try:
        raw = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            img = img.convert("L" if img.mode in _GREY_MODES else "RGB")
            return np.asarray(img)
    except (binascii.Error, TypeError, ValueError, UnidentifiedImageError, OSError) as exc:
        raise BadInput(f'"image" must be base64 of a PNG (or another image file): {exc}') \
            from None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle connection is kept
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        if self.request.family != socket.AF_UNIX:  # headers and body are two writes: no Nagle
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("local API: " + format, *args)

    def _reply(self, status: int, doc: dict[str, Any], retry: bool = False) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        if self.path != "/v1/model":
            self._reply(404, {"error": f"no {self.path}: GET /v1/model or POST /v1/infer"})
            return
        cur = self.server.serving.slot.get()
        if cur is None:
            self._reply(503, {"error": "no model loaded yet"}, retry=True)
            return
        self._reply(200, {"model": cur.hybrid, "name": cur.desired.name,
                          "generation": cur.generation, "input": cur.input.to_meta()})

    def do_POST(self) -> None:  # noqa: N802 (stdlib's name)
        if self.path != "/v1/infer":
            self._reply(404, {"error": f"no {self.path}: POST /v1/infer or GET /v1/model"})
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
        try:
            body = json.loads(self.rfile.read(length))
            pred = self.server.serving.infer(decode_images(body))
        except (BadInput, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._reply(400, {"error": str(exc)})
        except Unavailable as exc:
            self._reply(503, {"error": str(exc)}, retry=True)
        except Exception as exc:
            log.exception("local API: inference failed")
            self._reply(500, {"error": str(exc)})
        else:
            self._reply(200, pred.to_json())


class _Bounded:
    """At most `MAX_CONNECTIONS` connections at once (a thread each); more are answered 503
    and closed at once. Idle keep-alive connections close after `_Handler.timeout`."""

    daemon_threads = True
    serving: Serving
    _slots = threading.BoundedSemaphore(1)  # replaced per server

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server(_Bounded, ThreadingHTTPServer):
    pass


class _UnixServer(_Bounded, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
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
            self._server: socketserver.BaseServer = _UnixServer(str(path), _Handler)
            os.chmod(path, 0o660)  # the board's users in the agent's group
        else:
            self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.serving = serving
        self._server._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
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
        if self._path is not None:
            Path(self._path).unlink(missing_ok=True)
