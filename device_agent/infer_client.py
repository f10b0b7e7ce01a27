"""`restnet infer`: ask a board's agent to classify images through its local API (`restnet
agent --serve-port PORT` or `--serve-socket PATH`). Standard library and numpy only: it starts
fast and needs no torch. A file travels as it is — an image file or a .npy array, its bytes
the request's body (docs/protocol.md §9) — all of them on one kept-alive connection."""
from __future__ import annotations

import argparse
import functools
import io
import json
import socket as _socket
from pathlib import Path
from typing import Any

NPY = "application/x-npy"  # the Content-Type of a body that is a .npy file
MAX_BODY = 64 * 2**20  # bytes of one request the agent reads
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
               ".bmp": "image/bmp"}
_MAX_LINE, _MAX_HEADERS = 65536, 100  # an answer's line length and header count


class Connection:
    """One kept-alive HTTP/1.1 connection to the agent's local API, on 127.0.0.1:`port` or on
    the Unix socket `socket`. A request leaves in one write, its head and body together (two
    writes wake the agent twice, as `http.client`'s do); the answer is read by its
    Content-Length. It opens on the first request, and again when the agent has closed it
    (an idle connection is closed after 30 s)."""

    def __init__(self, port: int | None = None, socket: Path | None = None,
                 timeout: float = 30.0) -> None:
        if (port is None) == (socket is None):
            raise ValueError("give the agent's port or its socket path, one of them")
        self.port, self.socket, self.timeout = port, socket, timeout
        self._sock: _socket.socket | None = None
        self._rfile: Any = None

    def _open(self) -> None:
        if self.socket is not None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket))
            except OSError:
                sock.close()
                raise
        else:
            sock = _socket.create_connection(("127.0.0.1", self.port), self.timeout)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        self._sock, self._rfile = sock, sock.makefile("rb")

    def close(self) -> None:
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = self._rfile = None

    def request(self, method: str, path: str, body: bytes = b"",
                content_type: str | None = None) -> tuple[int, bytes]:
        """(HTTP status, body of the answer). Raises OSError when the agent cannot be reached
        or answers something that is not HTTP."""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        data = head.encode() + b"\r\n" + body
        while True:
            fresh = self._sock is None
            if fresh:
                self._open()
            try:
                self._sock.sendall(data)
                return self._answer()
            except OSError as exc:
                self.close()
                if fresh or not isinstance(exc, ConnectionError):
                    raise  # else a kept connection the agent had closed: once more, afresh

    def _answer(self) -> tuple[int, bytes]:
        line = self._rfile.readline(_MAX_LINE)
        if not line:
            raise ConnectionResetError("the agent closed the connection")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise OSError(f"not an HTTP answer: {line[:80]!r}")
        headers = {}
        for _ in range(_MAX_HEADERS):
            line = self._rfile.readline(_MAX_LINE)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            raise OSError(f"bad Content-Length {length[:20]!r} in the agent's answer")
        body = self._rfile.read(int(length)) if length is not None else self._rfile.read()
        if length is not None and len(body) != int(length):
            raise OSError(f"the answer ended after {len(body)} of {int(length)} bytes")
        if length is None or headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return int(parts[1]), body


def npy_body(images: Any) -> bytes:
    """`images` (an array: uint8 pixels 0–255 or floats 0–1) as a .npy body, what
    `numpy.save` writes."""
    import numpy as np

    x = np.asarray(images)
    if x.dtype.hasobject:
        raise ValueError(f"images of dtype {x.dtype}: send uint8 (0–255) or float (0–1)")
    return _npy_head(x.dtype, x.shape) + x.tobytes()  # C order, whatever x's layout


@functools.lru_cache(maxsize=64)
def _npy_head(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The .npy head of C-ordered arrays of `dtype` and `shape`, made once for each (an
    application sends the same few, and making one costs more than the rest of the body)."""
    import numpy as np

    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def request_body(path: Path) -> tuple[bytes, str]:
    """The body for one file and its Content-Type: an image file or a .npy array, as it is."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_TYPES and suffix != ".npy":
        raise ValueError(f"{path}: expected an image ({', '.join(IMAGE_TYPES)}) or a .npy "
                         "array")
    if path.stat().st_size > MAX_BODY:
        raise ValueError(f"{path}: over {MAX_BODY} bytes, more than one request takes; split "
                         "the batch")
    return path.read_bytes(), IMAGE_TYPES.get(suffix, NPY)


def post(conn: Connection, body: bytes, content_type: str = NPY) -> tuple[int, dict[str, Any]]:
    """POST `body` to /v1/infer; (HTTP status, decoded answer)."""
    status, raw = conn.request("POST", "/v1/infer", body, content_type)
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {"error": raw[:200].decode(errors="replace")}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="restnet infer", description="classify images with the "
                                "model a board's agent runs (its local API)")
    p.add_argument("files", type=Path, nargs="+", help="image files (PNG...) or .npy arrays "
                   "(N×C×H×W, N×H×W[×C]; uint8 0–255 or float 0–1)")
    p.add_argument("--port", type=int, help="the agent's --serve-port")
    p.add_argument("--socket", type=Path, help="the agent's --serve-socket")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the raw answers")
    args = p.parse_args(argv)
    if (args.port is None) == (args.socket is None):
        p.error("give --port or --socket (what `restnet agent` serves on)")
    conn = Connection(args.port, args.socket, args.timeout)
    failed = 0
    for path in args.files:
        try:
            body = request_body(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"restnet infer: {exc}") from exc
        try:
            status, doc = post(conn, *body)
        except OSError as exc:
            raise SystemExit(f"restnet infer: {exc} (is `restnet agent --serve-port` "
                             "running?)") from exc
        if status != 200:
            failed += 1
            print(f"{path}: error {status}: {doc.get('error')}")
        elif args.json:
            print(json.dumps({"file": str(path), **doc}))
        else:
            for k, (c, s) in enumerate(zip(doc["classes"], doc["scores"])):
                print(f"{path}[{k}]: class {c} (score {s[c]:.3f}) by {doc['model']} "
                      f"generation {doc['generation']} in {doc['latency_ms']:.1f} ms")
    conn.close()
    return 1 if failed else 0
