"""Issue 10 without a broker: bounded wire fields, sampled logs, the artifact server's limits
and fairness, pruning, one fine-tune per entry, the persisted key-set counter, and internal
errors told apart from bad input."""
import logging
import time
from types import SimpleNamespace

import pytest

from fleet_controller import service
from fleet_controller.artifacts import Artifacts
from fleet_controller.ratelog import SampledLog
from fleet_controller.serving import ArtifactServer, Bucket, ServeLimits
from fleet_controller.service import Controller
from fleet_controller.store import Deployment, Store
from fleet_protocol.messages import (MAX_GENERATION, Ack, ArtifactChunk, ArtifactRequest,
                                     ProtocolError, State, Telemetry, decode, encode)
from fleet_protocol.signing import KeyDir, Keyring, keyset, load_public, seal
from fleetloop import T, write_policy


# ---- the wire ---------------------------------------------------------------------------
def state(**kw) -> bytes:
    return encode(State(device_id="d1", online=True, session=1, ts=1.0)).replace(
        b"}", b"," + b",".join(f'"{k}":{v}'.encode() for k, v in kw.items()) + b"}", 1)


def test_generations_and_counters_fit_the_store():
    assert decode(State, state(generation=MAX_GENERATION)).generation == MAX_GENERATION
    for bad in [state(generation=2**63 - 1), state(generation=MAX_GENERATION + 1),
                state(session=2**63), state(keys_seq=-1)]:
        with pytest.raises(ProtocolError, match="less than or equal|greater than"):
            decode(State, bad)


@pytest.mark.parametrize("cls, doc, where", [
    (Telemetry, {"seq": 1, "ts": 1, "cpu": 0.1, "mem_free_mb": 1, "temp_c": 1,
                 "hybrid": "h" * 129}, "hybrid"),
    (Telemetry, {"seq": 1, "ts": 1, "cpu": 0.1, "mem_free_mb": 1, "temp_c": 1,
                 "inferences": 2**64}, "inferences"),
    (Ack, {"device_id": "d", "deployment_id": "d.1", "generation": 1, "status": "FAILED",
           "ts": 1, "reason": "x" * 1025}, "reason"),
    (Ack, {"device_id": "d", "deployment_id": "d.1", "generation": 1, "status": "FETCHING",
           "ts": 1, "done": 10**9}, "done"),
    (ArtifactRequest, {"artifact": "a" * 64, "chunks": [2**40]}, "chunks"),
    (ArtifactChunk, {"artifact": "a" * 64, "index": 0, "total": 1, "size": 2**41,
                     "artifact_sha256": "a" * 64, "sha256": "a" * 64}, "size"),
])
def test_every_field_is_bounded(cls, doc, where):
    import json

    with pytest.raises(ProtocolError, match=where):
        decode(cls, json.dumps(doc).encode())


def test_non_finite_numbers_are_refused():
    with pytest.raises(ProtocolError, match="ts"):
        decode(State, b'{"device_id": "d", "online": true, "session": 1, "ts": NaN}')


# ---- sampled logs -----------------------------------------------------------------------
def test_bad_input_logs_are_sampled_per_device(caplog):
    slog = SampledLog(logging.getLogger("t"), period_s=10.0, max_keys=2)
    with caplog.at_level(logging.WARNING):
        for k in range(1000):  # 1,000 bad messages in 1 s from one device
            slog.warning("d1", 100.0 + k / 1000, "dropped %d", k)
        slog.warning("d2", 100.5, "dropped from d2")
        slog.warning("d1", 110.0, "dropped again")
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 0", "dropped from d2", "dropped again (999 similar lines suppressed)"]
    slog.warning("d3", 111.0, "third device")  # max_keys=2: the oldest key is forgotten
    assert slog.allow("d2", 111.0) == 0


# ---- the artifact server ----------------------------------------------------------------
def test_token_bucket():
    b = Bucket(rate=2.0, burst=3, tokens=3, t=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.25) and not b.take(0.25)  # any token left lets one through, into debt
    assert b.ready_in(0.25) == pytest.approx(0.25)
    assert b.take(100.0, 50) and b.tokens == -47 and b.ready_in(100.0) == pytest.approx(23.5)


class FakeArtifacts(Artifacts):
    """Segments of known bytes, without a catalog; counts how often an index is computed."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        super().__init__(catalog=None)
        self._segments.update(blobs)
        self.built = 0

    def segment(self, seg_id):
        return self._segments.get(seg_id)

    def index(self, seg_id, chunk_size):
        before = len(self._indexes)
        idx = super().index(seg_id, chunk_size)
        self.built += len(self._indexes) > before
        return idx


A, B = "a" * 64, "b" * 64


NO_WINDOW = ServeLimits(window_chunks=10**6)  # no PUBACKs come in these tests


def server(limits=NO_WINDOW, **blobs):
    sent, clock = [], SimpleNamespace(t=0.0)
    srv = ArtifactServer(FakeArtifacts(blobs or {A: bytes(range(256)) * 40, B: b"b" * 5000}),
                         lambda device, payload, n: sent.append((device, decode(
                             ArtifactChunk, payload))), limits, clock=lambda: clock.t)
    return srv, sent, clock


def drain(srv) -> int:
    steps = 0
    while srv.serve_once():
        steps += 1
    return steps


def test_chunk_hashes_are_computed_once_per_segment_and_size():
    srv, sent, _ = server()
    for _ in range(3):
        assert srv.submit("d1", ArtifactRequest(artifact=A, chunk_size=1024)) == "queued"
    srv.submit("d1", ArtifactRequest(artifact=A, chunk_size=2048))
    drain(srv)
    assert srv.artifacts.built == 2
    assert len(sent) == 3 * 10 + 5 and all(c.sha256 and c.data for _, c in sent)


def test_one_device_asking_much_does_not_starve_another():
    srv, sent, _ = server()
    for _ in range(8):
        srv.submit("flood", ArtifactRequest(artifact=A, chunk_size=1024))
    srv.submit("quiet", ArtifactRequest(artifact=B, chunk_size=1024))
    drain(srv)
    order = [d for d, _ in sent]
    # round robin: the quiet device's 5 chunks go out within its first turns, not after 80
    assert order.index("quiet") <= 2 and max(i for i, d in enumerate(order) if d == "quiet") < 15


def test_per_device_limits():
    lim = ServeLimits(request_burst=3, requests_per_s=1.0, queued_requests=2,
                      request_bytes=4096, bytes_per_s=2048.0, window_chunks=10**6)
    srv, sent, clock = server(lim)
    outcomes = [srv.submit("d1", ArtifactRequest(artifact=A, chunk_size=1024))
                for _ in range(5)]
    assert outcomes == ["queued", "queued", "busy", "throttled", "throttled"]
    assert srv.submit("d1", ArtifactRequest(artifact=A), needed=False) == "throttled"
    drain(srv)
    # one request may produce request_bytes (4 chunks of 1 KiB), then the device's byte rate
    # (a burst of request_bytes) is spent: nothing more until the clock moves
    assert len(sent) == 4 and srv.stats["truncated"] == 1
    clock.t += 2.0  # 4 KiB more at 2 KiB/s
    drain(srv)
    assert len(sent) == 8 and srv.pending("d1") == 0


def test_the_window_waits_for_the_broker():
    srv, sent, _ = server(ServeLimits(window_bytes=3000, window_chunks=3))
    srv.submit("d1", ArtifactRequest(artifact=A, chunk_size=1024))
    drain(srv)
    assert len(sent) == 2  # each encoded chunk is ~1.5 KB: the window is full
    srv.acked(1500)
    srv.acked(1500)
    drain(srv)
    assert len(sent) == 4
    srv, sent, _ = server(ServeLimits(window_chunks=3))
    srv.submit("d1", ArtifactRequest(artifact=A, chunk_size=1024))
    drain(srv)
    assert len(sent) == 3  # and in messages
    srv.reset_window()  # the connection was lost: nothing in flight will be acked
    drain(srv)
    assert len(sent) == 6


# ---- the controller ---------------------------------------------------------------------
@pytest.fixture
def ctl(catalog, keys, tmp_path):
    c = Controller(write_policy(tmp_path / "fleet.yaml", catalog.root, finetune_on_demand=True),
                   tmp_path / "ctl", SimpleNamespace(submit=lambda fn: fn()), keys)
    c.client = SimpleNamespace(publish=lambda *a, **kw: SimpleNamespace(mid=1))
    yield c
    c.store.close()


def message(topic, payload, retain=False):
    return SimpleNamespace(topic=topic, payload=payload, qos=1, retain=retain)


def telemetry(**kw) -> bytes:
    return encode(Telemetry(**{"seq": 1, "ts": time.time(), "cpu": 0.1, "mem_free_mb": 900,
                               "battery": 0.9, "temp_c": 40, **kw}))


def test_internal_errors_are_errors_with_a_traceback_not_bad_input(ctl, catalog, monkeypatch,
                                                                    caplog):
    def broken(*args):
        raise ValueError("a bug, not the device's fault")

    monkeypatch.setattr(service, "learn_speed", broken)
    ctl._on_message(None, None, message(T.telemetry("d1"), telemetry(
        hybrid=catalog.anchors[0].id, lat_p50_ms=5.0)))
    assert (ctl.stats["errors"], ctl.stats["dropped"]) == (1, 0)
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    ctl._on_message(None, None, message(T.telemetry("d1"), b"junk"))
    assert (ctl.stats["errors"], ctl.stats["dropped"]) == (1, 1)


def test_telemetry_is_conflated_per_device_and_applied_a_batch_per_pass(ctl):
    passes = []  # the loop's passes, driven by hand: each submitted call is one
    ctl.host = SimpleNamespace(submit=passes.append)
    for k in range(3):  # d0 reports three times before the loop gets to it
        ctl._on_message(None, None, message(T.telemetry("d0"), telemetry(battery=0.5 + k / 10)))
    for k in range(1, service.TELEMETRY_BATCH + 9):
        ctl._on_message(None, None, message(T.telemetry(f"d{k}"), telemetry()))
    ctl._on_message(None, None, message(T.telemetry("d1"), b"junk"))  # d1's newest: bad
    assert ctl.stats["telemetry_conflated"] == 3 and len(passes) == 1 and not ctl.twins
    passes.pop()()
    assert ctl.stats["in_telemetry"] + ctl.stats["dropped"] == service.TELEMETRY_BATCH
    assert ctl.twins["d0"].battery == pytest.approx(0.7)  # its newest report, in d0's place
    assert "d1" not in ctl.twins and ctl.stats["dropped"] == 1
    assert len(passes) == 1 and len(ctl.inbox) == 9  # the rest: the next pass
    passes.pop()()
    assert not passes and not ctl.inbox and ctl.stats["in_telemetry"] == len(ctl.twins)
    assert len(ctl.twins) == service.TELEMETRY_BATCH + 8  # d0 to d40, but d1


def test_one_failing_device_does_not_stop_the_reconcile(ctl, monkeypatch, caplog):
    for d in ("a", "b", "c"):
        ctl.twins[d] = service.Twin(device_id=d, online=True)
    seen = []

    def reconcile(device, now, trigger=None):
        seen.append(device)
        if device == "a":
            raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(ctl, "_reconcile", reconcile)
    ctl._reconcile_all()
    assert seen == ["a", "b", "c"] and ctl.stats["errors"] == 1
    assert "reconciling a failed" in caplog.text


def test_a_device_claiming_the_largest_generation_gets_no_deployment(ctl, catalog):
    birth = State(device_id="d9", online=True, session=1, ts=time.time(),
                  generation=MAX_GENERATION, capabilities={"device_class": "rpi4",
                                                           "mem_mb": 4096, "gflops": 10})
    ctl._on_message(None, None, message(T.state("d9"), encode(birth)))
    ctl._on_message(None, None, message(T.telemetry("d9"), telemetry()))
    assert ctl.stats["generation_exhausted"] == 1 and ctl.stats["errors"] == 0
    assert ctl.store.deployments("d9") == []


def test_retained_or_unneeded_artifact_requests_are_not_served(ctl, catalog):
    seg = catalog.anchors[0].segments[0]
    req = encode(ArtifactRequest(artifact=seg))
    ctl._on_message(None, None, message(T.art_req("d1"), req, retain=True))
    ctl._on_message(None, None, message(T.art_req("d1"), req))
    assert ctl.stats["art_retained_ignored"] == 1 and ctl.stats["art_not_needed"] == 1
    assert ctl.serving.pending("d1") == 0
    ctl.needs["d1"] = frozenset([seg])
    ctl._on_message(None, None, message(T.art_req("d1"), req))
    assert ctl.stats["art_queued"] == 1 and ctl.serving.pending("d1") == 1


def test_a_finetune_runs_once_per_entry(ctl, catalog):
    entry = next(e for e in catalog.hybrids if e.stitch_state == "ls")
    rule = SimpleNamespace(latency_p95_ms=float("inf"), min_accuracy=0.0,
                           finetune_on_demand=True)
    runs = []
    ctl.finetuner = SimpleNamespace(run=lambda entry_id: runs.append(entry_id) or {})
    ctl._finetuned = lambda entry_id, update: None
    ctl._deploy("d1", entry, rule, "first", None, time.time(), None)
    ctl._finetune_next()  # the fine-tune is running (its result not applied yet) ...
    ctl._deploy("d2", entry, rule, "second", None, time.time(), None)  # ... deployed again
    ctl._finetune_next()
    assert runs == [entry.id]


def test_prune_keeps_open_and_newest_deployments(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    try:
        for gen, status, t in [(1, "HEALTHY", 10.0), (2, "FAILED", 20.0), (3, "HEALTHY", 30.0),
                               (4, "FAILED", 40.0), (5, "sent", 50.0)]:
            store.add_deployment(Deployment(f"d.{gen}", "d", gen, "h", status, "", t, t, 1))
        store.add_deployment(Deployment("e.1", "e", 1, "h", "FAILED", "", 1.0, 1.0, 1))
        store.event(1.0, None, "old", "")
        assert store.prune(before=1000.0) == (1 + 6, 3)  # 6 "deploy" events and the old one
        assert [d.id for d in store.deployments()] == ["e.1", "d.3", "d.5"]
        assert store.last_generation("d") == 5 and store.running_artifacts() == {"d": ""}
    finally:
        store.close()


def test_keyset_seq_is_a_persisted_counter(tmp_path, monkeypatch):
    keys = KeyDir(tmp_path / "keys")
    keys.init()
    assert keys.seq() == 1
    keys.rotate()
    assert KeyDir(tmp_path / "keys").seq() == 2
    keys.retire()
    assert keys.retire() == [] and keys.seq() == 3
    legacy = KeyDir(tmp_path / "legacy")
    legacy.init()
    legacy.seq_path.unlink()  # made before the counter: it starts above the old ms stamps
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    assert legacy.seq() == 1_700_000_000_000
    legacy.rotate()
    assert legacy.seq() == 1_700_000_000_001
    ring = Keyring([load_public(tmp_path / "keys" / "controller.pub")])
    current, _ = keys.load()
    assert ring.accept(seal(keyset([current], keys.seq(), 1.0), [current])) is False
    assert ring.seq == 3
