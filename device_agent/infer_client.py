"""`restnet infer`: ask a board's agent to classify images through its local API (`restnet
agent --serve-port PORT`). Standard library and numpy only: it starts fast and needs no torch."""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request_body(path: Path) -> dict[str, Any]:
    """The JSON body for one file: an image file as base64, a .npy array as nested lists."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return {"image": base64.b64encode(path.read_bytes()).decode()}
    if path.suffix.lower() == ".npy":
        import numpy as np

        x = np.load(path, allow_pickle=False)
        return {"array": x.tolist(), "dtype": "uint8" if x.dtype == np.uint8 else "float"}
    raise ValueError(f"{path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy array")


def post(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST `body` to /v1/infer; (HTTP status, decoded answer)."""
    conn.request("POST", "/v1/infer", json.dumps(body).encode(),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw) if raw else {}
    except ValueError:
        return resp.status, {"error": raw[:200].decode(errors="replace")}


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
    conn = (_UnixConnection(str(args.socket), args.timeout) if args.socket
            else http.client.HTTPConnection("127.0.0.1", args.port, timeout=args.timeout))
    failed = 0
    for path in args.files:
        try:
            status, doc = post(conn, request_body(path))
        except (OSError, ValueError) as exc:
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
    return 1 if failed else 0
