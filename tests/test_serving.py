"""Inference on the board: the agent serves its running model to applications (in process
and over the local HTTP API), through swaps and rollbacks, with nothing dropped or mixed up;
its telemetry reports what it served; its import path holds nothing that trains or draws."""
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from device_agent.cache import SegmentCache, provision
from device_agent.infer_client import Connection, npy_body
from device_agent.infer_client import main as infer_main
from device_agent.infer_client import post as post_body
from device_agent.localapi import LocalAPI
from device_agent.runtime import LatencyWindow, Loaded, ModelSlot
from device_agent.serving import BadInput, Serving, Unavailable, to_input
from fleet_protocol.messages import Ack, Desired, State, Telemetry, decode
from fleetloop import T
from simulators.fleet import Scenario
from stitch_lib.data import ImageSet, _prepare
from stitch_lib.inputs import InputSpec
from test_faults import Watch, agent_cmd, spawn  # noqa: F401  (spawn: a fixture)

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def test_served_images_are_prepared_exactly_as_the_training_data():
    x = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)  # Fashion-MNIST-sized, grey
    trained = _prepare(ImageSet(torch.from_numpy(x[:, None]), torch.zeros(3, dtype=torch.int64),
                                ("a",)), torch.arange(3), 32).x
    spec = InputSpec(1, (32, 32))
    for form in (x, x[:, None], x[..., None], x.astype(np.float32) / 255):  # NHW, NCHW, NHWC
        assert torch.allclose(to_input(form, spec), trained, atol=1e-5)
    rgb = np.repeat(x[..., None], 3, axis=-1)  # grey as RGB comes back to the same grey
    assert torch.allclose(to_input(rgb, spec), trained, atol=1e-4)
    assert to_input(x, InputSpec(3, (16, 16))).shape == (3, 3, 16, 16)  # grey → RGB, resized


@pytest.mark.parametrize("images, says", [
    ([[1, 2], [3]], "not a numeric array"),
    (np.full((1, 8, 8), 300), "[0, 255]"),
    (np.full((1, 8, 8), 1.5, np.float32), "[0, 1]"),
    (np.zeros((1, 1, 1, 8, 8)), "N×C×H×W"),
    (np.zeros((1, 5, 8, 7)), "no channel axis"),
    (np.zeros((0, 8, 8)), "values"),
])
def test_unreadable_images_are_refused_saying_why(images, says):
    with pytest.raises(BadInput, match=says.replace("[", r"\[").replace("]", r"\]")):
        to_input(images, InputSpec(1, (8, 8)))


class Linear(torch.nn.Module):
    """A deterministic stand-in model: class scores from the mean pixel."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m * self.scale, -m * self.scale, m * 0], dim=1)


def loaded(scale: float, generation: int) -> Loaded:
    d = Desired(device_id="d", generation=generation, deployment_id=f"x{generation}",
                hybrid=f"h{generation}", name=f"model {generation}", front=["ab" * 32], ts=0)
    return Loaded(Linear(scale), d, 1, InputSpec(1, (8, 8)))


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_local_http_api_and_restnet_infer(tmp_path, capsys):
    slot, latency = ModelSlot(), LatencyWindow()
    api = LocalAPI(Serving(slot, latency), port=0)
    api.start()
    base = f"http://127.0.0.1:{api.port}"
    try:
        status, doc = post(f"{base}/v1/infer", b'{"array": [[[0]]]}')
        assert status == 503 and "no model" in doc["error"]
        slot.swap(loaded(2.0, 7))
        latency.reset(slot.get())
        status, doc = get(f"{base}/v1/model")
        assert status == 200 and doc["generation"] == 7 and doc["input"]["size"] == [8, 8]
        img = np.full((8, 8), 200, np.uint8)
        status, doc = post(f"{base}/v1/infer", json.dumps({"array": [img.tolist()] * 2}).encode())
        assert status == 200 and doc["classes"] == [0, 0] and doc["model"] == "h7"
        assert doc["generation"] == 7 and len(doc["scores"][0]) == 3
        by_png = post(f"{base}/v1/infer",
                      json.dumps({"image": base64.b64encode(png(img)).decode()}).encode())[1]
        assert by_png["scores"][0] == pytest.approx(doc["scores"][0], abs=1e-6)
        for body, code in [(b"{", 400), (b'{"array": [[1, 2], [3]]}', 400),
                           (b'{"image": "not base64!"}', 400), (b'{"both": 1}', 400)]:
            status, doc = post(f"{base}/v1/infer", body)
            assert status == code and doc["error"], body
        assert get(f"{base}/nowhere")[0] == 404
        assert latency.count == 2  # the two good requests, for telemetry

        (tmp_path / "a.png").write_bytes(png(img))
        np.save(tmp_path / "b.npy", np.zeros((2, 8, 8), np.float32))
        assert infer_main([str(tmp_path / "a.png"), str(tmp_path / "b.npy"),
                           "--port", str(api.port)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 3 and all("by h7 generation 7" in line for line in out), out
    finally:
        api.stop()

    sock = tmp_path / "agent.sock"
    api = LocalAPI(Serving(slot, latency), path=sock)
    api.start()
    try:
        assert infer_main([str(tmp_path / "a.png"), "--socket", str(sock), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["generation"] == 7
    finally:
        api.stop()


def npy(x: np.ndarray) -> bytes:
    """What numpy.save writes, pickles allowed (to send what the agent must refuse)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    return buf.getvalue()


def read_answer(f) -> tuple[int, dict]:
    """The status and JSON body of an answer, read from the socket file `f`."""
    status, length = int(f.readline().split()[1]), 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        length = int(value) if name.lower() == b"content-length" else length
    return status, json.loads(f.read(length))


def test_npy_and_image_bodies_on_kept_connections_over_tcp_and_a_unix_socket(tmp_path):
    """The fast path: a .npy or image file as the body, on one kept-alive connection, over
    TCP or a Unix socket; answers equal the JSON body's; bad bodies get a 400 saying why."""
    slot, latency = ModelSlot(), LatencyWindow()
    slot.swap(loaded(2.0, 7))
    latency.reset(slot.get())
    serving = Serving(slot, latency)
    tcp, unix = LocalAPI(serving, port=0), LocalAPI(serving, path=tmp_path / "api.sock")
    tcp.start()
    unix.start()
    try:
        img = RNG.integers(0, 256, (2, 8, 8), dtype=np.uint8)
        want = post(f"http://127.0.0.1:{tcp.port}/v1/infer",
                    json.dumps({"array": img.tolist()}).encode())[1]["scores"]
        for conn in (Connection(tcp.port), Connection(socket=tmp_path / "api.sock")):
            for x in (img, img.astype(np.float32) / 255, img.astype(">f4") / 255,
                      np.asfortranarray(img), img[..., None]):  # N×H×W×1
                status, doc = post_body(conn, npy_body(x))
                assert status == 200 and doc["generation"] == 7, doc
                np.testing.assert_allclose(doc["scores"], want, atol=1e-5)
            kept = conn._sock
            status, doc = post_body(conn, png(img[0]), "image/png")
            assert status == 200
            np.testing.assert_allclose(doc["scores"], want[:1], atol=1e-5)
            assert conn._sock is kept  # one connection for all of them

            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "|u1", "fortran_order": False, "shape": (-1, 8)})
            for body, says in [
                (b"not a npy file", "not a .npy array"),
                (npy(np.array([{"a": 1}], dtype=object)), "dtype object"),
                (npy(np.zeros((1, 8, 8), np.complex64)), "dtype complex64"),
                (npy(img)[:-5], "the body holds"),
                (header.getvalue(), "negative"),
            ]:
                status, doc = post_body(conn, body)
                assert status == 400 and says in doc["error"], (says, doc)
            status, doc = post_body(conn, b"\x89PNG broken", "image/png")
            assert status == 400 and "not an image file" in doc["error"]
            status, doc = post_body(conn, b"", "application/json")  # 413, and closed ...
            assert status == 413 and conn._sock is None
            assert post_body(conn, npy_body(img))[0] == 200  # ... so the next one reconnects
        assert latency.count == 2 * 7 + 1

        with socket.create_connection(("127.0.0.1", tcp.port), timeout=10) as s:
            s.sendall(b"POST /v1/infer HTTP/1.1\r\nContent-Length: 100\r\n"
                      b"Content-Type: application/x-npy\r\n\r\nshort")
            s.shutdown(socket.SHUT_WR)
            status, doc = read_answer(s.makefile("rb"))
            assert status == 400 and "ended before" in doc["error"]
        with socket.create_connection(("127.0.0.1", tcp.port), timeout=10) as s:
            body = npy_body(img)
            s.sendall(b"POST /v1/infer HTTP/1.1\r\nExpect: 100-continue\r\nContent-Type: "
                      b"application/x-npy\r\nContent-Length: %d\r\n\r\n" % len(body))
            f = s.makefile("rb")
            assert f.readline() == b"HTTP/1.1 100 Continue\r\n"  # at once, not buffered
            assert f.readline() == b"\r\n"
            s.sendall(body)
            assert read_answer(f)[0] == 200
    finally:
        tcp.stop()
        unix.stop()


def test_request_heads_are_parsed_strictly_and_answered_in_one_piece():
    """The agent reads request heads itself (not with the standard library's email parser):
    names in any case, HTTP/1.0 closes unless kept alive, and what it cannot take gets the
    status that says why, on a connection it then closes."""
    slot, latency = ModelSlot(), LatencyWindow()
    slot.swap(loaded(2.0, 7))
    api = LocalAPI(Serving(slot, latency), port=0)
    api.start()
    body = npy_body(np.zeros((1, 8, 8), np.uint8))

    def ask(head: bytes, payload: bytes = b"") -> tuple[int, dict, dict, bytes]:
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
            s.sendall(head + payload)
            s.shutdown(socket.SHUT_WR)  # a kept connection then ends after its answers
            f = s.makefile("rb")
            status, headers = int(f.readline().split()[1]), {}
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            doc = f.read(int(headers.get(b"content-length", 0)))
            return status, json.loads(doc) if doc.startswith(b"{") else {}, headers, f.read()

    try:
        status, doc, headers, rest = ask(
            b"POST /v1/infer HTTP/1.1\r\ncontent-length: %d\r\nCONTENT-TYPE: application/x-npy; "
            b"v=1\r\n\r\n" % len(body), body)
        assert status == 200 and doc["generation"] == 7 and b"date" in headers
        assert b"connection" not in headers and rest == b""
        status, _, headers, rest = ask(b"GET /v1/model HTTP/1.0\r\n\r\n")
        assert status == 200 and headers[b"connection"] == b"close" and rest == b""
        status, _, headers, rest = ask(b"GET /v1/model HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                                       b"GET /v1/model HTTP/1.0\r\n\r\n")
        assert status == 200 and b"connection" not in headers and rest.startswith(b"HTTP/1.1 200")
        for head, code in [
            (b"POST /v1/infer\r\n\r\n", 400),  # no version
            (b"GET /v1/model HTTP/2.0\r\n\r\n", 505),
            (b"GET /v1/model HTTP/1.1\r\nno colon here\r\n\r\n", 400),
            (b"GET /v1/model HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
            (b"POST /v1/infer HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\n", 400),
            (b"GET /v1/model HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
            (b"GET /v1/model HTTP/1.1\r\nX-A: " + b"a" * 70000 + b"\r\n\r\n", 431),
        ]:
            status, _, headers, rest = ask(head, b"GET /v1/model HTTP/1.1\r\n\r\n")
            assert status == code and headers[b"connection"] == b"close", head[:40]
            assert rest == b"", head[:40]  # closed: the request after it is never read
    finally:
        api.stop()


def test_a_kept_connection_the_agent_closed_is_opened_afresh():
    """The agent closes an idle connection after 30 s: the client's next request goes out on
    a new one instead of failing."""
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
              b"\r\n{}")
    closed = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def agent() -> None:
            for _ in range(2):  # answer one request per connection, then close it
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(answer)
                closed.set()

        t = threading.Thread(target=agent, daemon=True)
        t.start()
        conn = Connection(server.getsockname()[1], timeout=10)
        assert post_body(conn, b"x") == (200, {})
        assert closed.wait(10)
        assert post_body(conn, b"x") == (200, {})
        t.join(10)
        assert not t.is_alive()


def test_connection_threads_are_kept_for_later_connections():
    """A new connection reuses an idle one's thread: no thread (and no torch thread team)
    is started per connection."""
    slot, latency = ModelSlot(), LatencyWindow()
    slot.swap(loaded(1.0, 1))
    api = LocalAPI(Serving(slot, latency), port=0)
    api.start()
    pool = api._server
    try:
        for _ in range(5):  # urllib: a new connection per request
            assert post(f"http://127.0.0.1:{api.port}/v1/infer", b'{"array": [[1]]}')[0] == 200
            deadline = time.monotonic() + 10  # the server sees the connection close
            while pool._idle < pool._threads and time.monotonic() < deadline:
                time.sleep(0.001)
        assert pool._threads == 1
    finally:
        api.stop()


def test_a_full_queue_refuses_at_once():
    gate, entered = threading.Event(), threading.Event()

    class Held(torch.nn.Module):
        def forward(self, x):
            entered.set()
            assert gate.wait(10)
            return torch.zeros(x.shape[0], 2)

    slot = ModelSlot()
    slot.swap(Loaded(Held(), loaded(1.0, 1).desired, 1, InputSpec(1, (8, 8))))
    serving = Serving(slot, LatencyWindow(), max_queue=1)
    img = np.zeros((1, 8, 8), np.uint8)
    first = threading.Thread(target=serving.infer, args=(img,))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=serving.infer, args=(img,))
    second.start()  # waits for the model: the queue is full now
    deadline = time.monotonic() + 10
    while serving.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert serving.queue_depth == 1
    with pytest.raises(Unavailable, match="busy"):
        serving.infer(img)
    gate.set()
    first.join(10)
    second.join(10)
    assert serving.requests == 2 and serving.errors == 1 and serving.queue_depth == 0


def log_swaps(agent) -> tuple[list, dict]:
    """Record the agent's swaps and rollbacks: (before, after, generation serving after) of
    each, and each generation's module."""
    changes, modules = [], {}
    swap, rollback = agent.slot.swap, agent.slot.rollback

    def logged_swap(new):
        t0 = time.perf_counter()
        ms = swap(new)
        modules[new.generation] = new.module
        changes.append((t0, time.perf_counter(), new.generation))
        return ms

    def logged_rollback():
        t0 = time.perf_counter()
        cur = rollback()
        changes.append((t0, time.perf_counter(), cur.generation))
        return cur

    agent.slot.swap, agent.slot.rollback = logged_swap, logged_rollback
    return changes, modules


class Traffic:
    """Three clients asking `agent` about `images` until `stop()`: one over the local HTTP API
    on `port`, two in process; each answer as (t0, t1, generation, scores), each failure kept."""

    def __init__(self, agent, port: int, images: np.ndarray) -> None:
        self.agent, self.url, self.images = agent, f"http://127.0.0.1:{port}/v1/infer", images
        self.body = json.dumps({"array": images.tolist()}).encode()
        self.answers, self.failures, self._stop = [], [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(k == 0,)) for k in range(3)]
        for t in self.threads:
            t.start()

    def _client(self, over_http: bool) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                if over_http:
                    status, doc = post(self.url, self.body)
                    assert status == 200, doc
                    gen, scores = doc["generation"], doc["scores"]
                else:
                    p = self.agent.infer(self.images)
                    gen, scores = p.generation, p.scores
            except Exception as exc:  # counted: the test wants none
                self.failures.append(repr(exc))
                continue
            self.answers.append((t0, time.perf_counter(), gen, scores))

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(30)


def check_answers(answers, changes, images, modules) -> None:
    """Every answer came whole from one model: the generation it names was serving at some
    moment while it ran (`changes`: (t0, t1, generation) of each swap or rollback), and its
    scores are that model's on `images`."""
    def serving_at_some_moment(t0, t1, gen):
        for k, (before, _, g) in enumerate(changes):
            until = changes[k + 1][1] if k + 1 < len(changes) else float("inf")
            if g == gen and before <= t1 and until >= t0:
                return True
        return False

    x = torch.from_numpy(images)
    expected = {g: torch.softmax(m(to_input(x, InputSpec(1, (32, 32)))), 1)
                for g, m in modules.items()}
    for t0, t1, gen, scores in answers:
        assert serving_at_some_moment(t0, t1, gen), (t0, t1, gen, changes)
        assert torch.allclose(torch.tensor(scores), expected[gen], atol=1e-5), gen


def test_requests_run_whole_on_one_model_through_swaps_and_a_rollback(loop, catalog, keys):
    """Threads classify the same images, in process and over HTTP, while signed deployments
    swap the model three times and a health check rolls one back: no request fails, and each
    answer is exactly what the generation it names computes, a generation that was serving
    at some moment while the request ran."""
    dev = "rpi4-serve"
    agent = loop.add_agent(dev)  # its own worker thread, as on a board
    deploy, acks = loop.publisher(keys, catalog, dev)
    _, telemetry = loop.spy("watcher", T.telemetry(dev))
    anchors, hybrids = catalog.anchors, catalog.hybrids
    plan = [(anchors[0], {}), (hybrids[0], {}), (anchors[1], {}),
            (hybrids[1], {"latency_budget_ms": 1e-6}),  # unhealthy: rolled back
            (anchors[2], {})]

    changes, modules = log_swaps(agent)

    deploy(1, plan[0][0], **plan[0][1])
    api = LocalAPI(agent.serving, port=0)
    api.start()
    images = RNG.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    traffic = Traffic(agent, api.port, images)
    answers, failures = traffic.answers, traffic.failures
    try:
        for k, (entry, extra) in enumerate(plan[1:], start=2):
            n = len(answers)
            deploy(k, entry, **extra)
            loop.run_until(lambda: len(answers) >= n + 5)  # requests ran on each model
        loop.run_until(lambda: any(decode(Telemetry, p).requests > 0 for _, p in telemetry))
    finally:
        traffic.stop()
        api.stop()

    assert not failures and agent.serving.errors == 0, failures[:3]
    statuses = [(a.generation, a.status) for a in (decode(Ack, p) for _, p in acks)]
    assert (4, "ROLLED_BACK") in statuses and (5, "HEALTHY") in statuses, statuses
    assert [g for _, _, g in changes] == [1, 2, 3, 4, 3, 5]
    gens = {g for _, _, g, _ in answers}
    assert {2, 3, 5} <= gens, gens  # every healthy model served

    check_answers(answers, changes, images, modules)

    reports = [decode(Telemetry, p) for _, p in telemetry]
    busy = next(r for r in reports if r.requests > 0)
    assert busy.req_rate > 0 and busy.lat_p95_ms is not None and busy.req_errors == 0
    stopped = time.time()  # idle from now: the reports still measure the model, by a probe

    def after():
        return [r for r in (decode(Telemetry, p) for _, p in telemetry) if r.ts > stopped]
    loop.run_until(lambda: len(after()) >= 2)
    idle = after()[1]  # the first may count requests made before `stopped`
    assert idle.requests == 0 and idle.inferences >= 1 and idle.lat_p50_ms is not None


def test_tags_travel_in_the_birth_to_the_controller(loop, catalog):
    ctl = loop.start_controller()
    agent = loop.add_agent("jetson-tagged", cls="jetson", tags={"site": "north"})
    _, states = loop.spy("state-watcher", T.state("jetson-tagged"))
    loop.run_until(lambda: ctl.twins.get("jetson-tagged") is not None
                   and ctl.twins["jetson-tagged"].tags == {"site": "north"})
    agent.set_tags({"site": "south", "floor": "2"})  # as a scenario event does
    loop.run_until(lambda: ctl.twins["jetson-tagged"].tags == {"site": "south", "floor": "2"})
    births = [decode(State, p) for _, p in states if p]
    assert births[-1].capabilities.tags == {"site": "south", "floor": "2"}
    with pytest.raises(ValueError, match="tags"):
        agent.set_tags({"": "empty key"} | {str(k): "v" for k in range(100)})


def test_scenario_events_carry_tags():
    sc = Scenario.from_dict(yaml.safe_load((ROOT / "scenarios" / "demo.yaml").read_text()))
    assert any(e.tags == {"site": "north"} and set(e.classes) == {"jetson", "rpi4"}
               for e in sc.events)  # what fleet.yaml's group `cameras` matches
    with pytest.raises(ValueError, match="tags must be a mapping"):
        Scenario.from_dict({"duration_s": 1, "events": [{"at": 0, "tags": ["site=north"]}]})


def test_the_agent_imports_nothing_that_trains_or_draws():
    heavy = ["stitch_lib.build", "stitch_lib.train", "stitch_lib.report", "stitch_lib.data",
             "stitch_lib.zoo", "stitch_lib.cka", "rich", "matplotlib"]
    code = ("import sys, device_agent.agent, device_agent.cli, device_agent.localapi; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow  # real processes
def test_restnet_agent_serves_what_restnet_infer_asks(loop, tmp_path, spawn):
    ctl = loop.start_controller()
    dev = "board-serve"
    with socket.socket() as s:  # a free port for the agent's API
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provision(SegmentCache(tmp_path / dev), loop.catalog)
    watch = Watch(loop, dev)
    spawn(dev, agent_cmd(loop, dev, tmp_path / dev, tmp_path, "--serve-port", str(port),
                         "--tag", "site=north"))
    loop.run_until(lambda: any(a.status == "HEALTHY" for a in watch.of(Ack, "/ack")),
                   timeout=90)
    assert ctl.twins[dev].tags == {"site": "north"}
    (tmp_path / "x.png").write_bytes(png(RNG.integers(0, 256, (28, 28), dtype=np.uint8)))
    out = subprocess.run([sys.executable, "-m", "restnet.cli", "infer", "--port", str(port),
                          "--json", str(tmp_path / "x.png")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == ctl.twins[dev].running and answer["generation"] >= 1
