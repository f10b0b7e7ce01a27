"""Fuzzing (hypothesis): random and mutated payloads never crash the controller or an agent;
every bad one is refused with a logged, counted reason, and a desired state whose signed body
changed is never applied. Oversized inputs are refused before they are parsed; fleet.yaml
errors name a field and line."""
import base64
import copy
import functools
import json
import os
import time
import zlib
from collections import Counter
from functools import reduce
from operator import getitem
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from device_agent.agent import _Fetch
from device_agent.worker import InlineWorker
from fleet_controller.policy import FleetPolicy, PolicyError, load_policy
from fleet_controller.service import Controller
from fleet_protocol import codec
from fleet_protocol.messages import (MAX_MESSAGE_BYTES, Ack, ArtifactChunk, ArtifactRequest,
                                     Capabilities, Desired, ProtocolError, Rebirth, State,
                                     Telemetry, decode, encode)
from fleet_protocol.signing import KeyDir, Keyring, KeySet, Signed, keyset, seal, unverified
from fleetloop import T, healthy, write_policy

DEV = "fz-01"  # a device the controller hears of only from the fuzzer
BIG = b'{"pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'


# CI runs a fixed, derandomised set of cases, the same on every run; the long fuzz run
# (bench/fuzz_bench.py) sets RESTNET_FUZZ_SCALE to draw fresh cases, that many times more,
# and RESTNET_FUZZ_COUNT to a file that receives how many inputs each fuzz test ran.
FUZZ_SCALE = int(os.environ.get("RESTNET_FUZZ_SCALE", "0"))
FUZZ_COUNT = os.environ.get("RESTNET_FUZZ_COUNT")
RAN: Counter = Counter()  # fuzz test → inputs run


def fuzz(n):
    """Hypothesis settings for `n` cases (times RESTNET_FUZZ_SCALE), counting the inputs run;
    apply it above `@given`."""
    chosen = settings(max_examples=n * max(1, FUZZ_SCALE), derandomize=not FUZZ_SCALE,
                      deadline=None, database=None, suppress_health_check=[
                          HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    def apply(test):
        test = chosen(test)
        inner = test.hypothesis.inner_test

        @functools.wraps(inner)
        def counted(*args, **kwargs):
            RAN[inner.__qualname__.replace(".<locals>", "")] += 1
            return inner(*args, **kwargs)
        test.hypothesis.inner_test = counted
        return test
    return apply


@pytest.fixture(scope="module", autouse=True)
def report_inputs_run():
    """Write RAN to RESTNET_FUZZ_COUNT (JSON) when the module's tests are done."""
    yield
    if FUZZ_COUNT:
        Path(FUZZ_COUNT).write_text(json.dumps(RAN))


def dumps(v) -> bytes:
    return json.dumps(v).encode()


SCALAR = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
          | st.text(max_size=20))
JSONV = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
ODD = JSONV | st.sampled_from([float("nan"), float("inf"), -1, -1e308, 2**63, 2**200, "",
                               "x" * 200, "x" * 300_000, "a/b", [], {}])


def payloads(cls):
    """Raw bytes, any JSON, or a JSON object with `cls`'s real field names and odd values."""
    named = st.fixed_dictionaries({}, optional={f: ODD for f in cls.model_fields})
    return st.binary(max_size=300) | JSONV.map(dumps) | named.map(dumps)


# A mutation is drawn as a plan independent of the payload (positions wrap around its length),
# so hypothesis can replay it even where the payload (a timestamp, a generation) differs.
BYTE_PLAN = st.tuples(st.sampled_from(["flip", "cut", "dup", "drop", "pad"]),
                      st.integers(0, 2**16), st.integers(0, 2**16), st.integers(1, 255))
DOC_PLAN = st.tuples(st.integers(0, 2**16), st.sampled_from(["replace", "drop", "rename"]),
                     ODD, st.integers(0, 3))
MUTATION = st.tuples(st.just("bytes"), BYTE_PLAN) | st.tuples(st.just("json"), DOC_PLAN)


def mutate_bytes(blob: bytes, plan) -> bytes:
    """A byte flipped, the tail cut, a slice duplicated or dropped, or whitespace around it."""
    op, i, j, x = plan
    i %= len(blob)
    j = i + j % (len(blob) - i + 1)
    return {"flip": lambda: blob[:i] + bytes([blob[i] ^ x]) + blob[i + 1:], "cut": lambda: blob[:i],
            "dup": lambda: blob[:j] + blob[i:j] + blob[j:], "drop": lambda: blob[:i] + blob[j:],
            "pad": lambda: b" " * i + blob + b"\n"}[op]()


def paths(v, at=()):
    yield at
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        yield from paths(x, at + (k,))


def mutate_doc(doc, plan):
    """(path, mutated copy): one value replaced by an odd one, dropped, or its key renamed to a
    near miss."""
    n, op, value, variant = plan
    doc = copy.deepcopy(doc)
    every = list(paths(doc))[1:]
    path = every[n % len(every)]
    parent, key = reduce(getitem, path[:-1], doc), path[-1]
    if op == "drop":
        del parent[key]
    elif op == "rename" and isinstance(key, str) and len(key) > 1:
        new = [key[:-1], key + key[-1], key.upper(), key[1:] + key[0]][variant]
        if new not in parent:
            parent[new] = parent.pop(key)
            path = path[:-1] + (new,)
    else:
        parent[key] = value
    return path, doc


def mutate(blob: bytes, mutation) -> bytes:
    how, plan = mutation
    return mutate_bytes(blob, plan) if how == "bytes" else dumps(mutate_doc(json.loads(blob),
                                                                             plan)[1])


def valid(parse, payload) -> bool:
    try:
        parse(payload)
        return True
    except ProtocolError:
        return False


def feed(node, topic, payload, caplog):
    """Hand `payload` to a controller's or agent's handler as MQTT would; nothing may raise,
    and a drop is logged with its reason. Returns how `dropped` grew."""
    dropped = node.stats["dropped"]
    caplog.clear()
    node._on_message(node.client, None, SimpleNamespace(topic=topic, payload=payload, qos=1,
                                                        retain=False))
    while getattr(node, "inbox", None):  # the controller applies filed telemetry a pass later
        node._apply_telemetry()
    assert node.stats["errors"] == 0, (topic, payload[:300])
    if node.stats["dropped"] > dropped:
        why = [r.getMessage() for r in caplog.records if "dropped message" in r.getMessage()]
        assert why and why[-1].split(f"{topic}: ", 1)[1], caplog.text
    return node.stats["dropped"] - dropped


def never_parsed(monkeypatch, *classes) -> list:
    """Make `model_validate_json` of `classes` record its calls instead of parsing."""
    calls = []
    for c in classes:
        monkeypatch.setattr(c, "model_validate_json", classmethod(lambda c, p: calls.append(c)))
    return calls


# ---- the controller ---------------------------------------------------------------------
CTL = {"state": (T.state, State), "telemetry": (T.telemetry, Telemetry), "ack": (T.ack, Ack),
       "art_req": (T.art_req, ArtifactRequest)}


def feed_ctl(ctl, kind, payload, caplog):
    """Exactly one of handled (in_<kind>) or dropped; dropped whenever it does not parse."""
    before = sum(v for k, v in ctl.stats.items() if k.startswith("in_"))
    grew = feed(ctl, CTL[kind][0](DEV), payload, caplog)
    handled = sum(v for k, v in ctl.stats.items() if k.startswith("in_")) - before
    assert grew + handled == 1, (kind, payload[:300])
    if (payload or kind != "state") and not valid(lambda p: decode(CTL[kind][1], p), payload):
        assert grew == 1, (kind, payload[:300])  # (an empty retained state clears the topic)


def test_controller_refuses_random_and_mutated_payloads(loop, catalog, monkeypatch, caplog):
    ctl = loop.start_controller()
    ctl.badlog.period_s = 0.0  # every drop logged, so each one's reason can be checked
    loop.run_until(lambda: ctl.client.is_connected())
    seg, hyb, now = catalog.anchors[0].segments[0], catalog.hybrids[0].id, time.time()
    real = {"state": State(device_id=DEV, online=True, session=1, ts=now, hybrid=hyb,
                           capabilities=Capabilities(device_class="rpi4", mem_mb=2048, gflops=5,
                                                     tags={"site": "north"}), segments=[seg]),
            "telemetry": Telemetry(seq=1, ts=now, cpu=0.3, mem_free_mb=900, battery=0.8,
                                   temp_c=40, lat_p50_ms=4, lat_p95_ms=6, hybrid=hyb),
            "ack": Ack(device_id=DEV, deployment_id=f"{DEV}.1", generation=1, status="FETCHING",
                       ts=now, done=1, total=2),
            "art_req": ArtifactRequest(artifact=seg, chunks=[0, 1], chunk_size=1024)}

    @fuzz(200)
    @given(st.sampled_from(list(CTL)), st.data())
    def random_payloads(kind, data):
        feed_ctl(ctl, kind, data.draw(payloads(CTL[kind][1])), caplog)

    @fuzz(200)
    @given(st.sampled_from(list(CTL)), MUTATION)
    def mutated_payloads(kind, mutation):
        feed_ctl(ctl, kind, mutate(encode(real[kind]), mutation), caplog)

    random_payloads()
    mutated_payloads()
    calls = never_parsed(monkeypatch, *(cls for _, cls in CTL.values()))
    for kind in CTL:
        assert feed(ctl, CTL[kind][0](DEV), BIG, caplog) == 1 and calls == []
    loop.host.run(timeout=0.5)  # what the handlers published goes out; nothing breaks
    assert ctl.stats["errors"] == 0


def test_an_artifact_request_cannot_multiply_the_chunks_sent(catalog, keys, tmp_path, caplog):
    """A device asking for one chunk many times gets it once (no amplification)."""
    ctl = Controller(write_policy(tmp_path / "fleet.yaml", catalog.root), tmp_path / "ctl",
                     SimpleNamespace(submit=lambda fn: fn()), keys)
    sent = []
    ctl.client = SimpleNamespace(publish=lambda topic, payload, **kw: sent.append(topic)
                                 or SimpleNamespace(mid=len(sent)))
    seg = catalog.anchors[0].segments[0]
    ctl.needs[DEV] = frozenset([seg])  # its desired state needs the segment
    try:
        feed_ctl(ctl, "art_req", encode(ArtifactRequest(artifact=seg, chunks=[0] * 500)), caplog)
        while ctl.serving.serve_once():  # the artifact server's steps, in this thread
            pass
    finally:
        ctl.store.close()
    assert len(sent) == 1, f"one chunk asked for 500 times was sent {len(sent)} times"


# ---- an agent -----------------------------------------------------------------------------
DESIRED_OUTCOMES = ("dropped", "refused", "stale", "replayed", "RECEIVED")


def healthy_agent(loop):
    loop.start_controller()
    agent = loop.add_agent("rpi4-fz", worker=InlineWorker())  # handled as it is fed
    loop.run_until(lambda: healthy(agent) >= 1)
    return agent, KeyDir(loop.keys).load()[0]


def running(agent):
    return agent.slot.get().hybrid, agent.applied


def outcomes(agent) -> int:
    return sum(agent.stats[n] for n in DESIRED_OUTCOMES)


def still_signed(payload, good, key_id) -> bool:
    """True if `payload` is an envelope around exactly the body of `good` that still carries its
    signature (only the envelope changed)."""
    env = json.loads(good)
    try:
        got = decode(Signed, payload)
    except ProtocolError:
        return False

    def same(s):
        try:
            return s.key == key_id and base64.b64decode(s.sig, validate=True) == \
                base64.b64decode(env["sigs"][0]["sig"])
        except ValueError:
            return False
    return got.body == env["body"] and any(map(same, got.sigs))


def test_agent_refuses_random_payloads(loop, monkeypatch, caplog):
    agent, _ = healthy_agent(loop)
    dev, was = agent.cfg.device_id, running(agent)
    kinds = {T.desired(dev): (Desired, lambda p: unverified(Desired, p)),
             T.art_data(dev): (ArtifactChunk, lambda p: decode(ArtifactChunk, p)),
             T.ctl_keys: (KeySet, lambda p: Keyring([]).open(KeySet, p)),  # unsigned: invalid
             T.rebirth: (Rebirth, lambda p: decode(Rebirth, p))}

    @fuzz(250)
    @given(st.sampled_from(list(kinds)), st.data())
    def run(topic, data):
        cls, parse = kinds[topic]
        payload = data.draw(payloads(cls) | payloads(Signed))
        before = outcomes(agent)
        assert feed(agent, topic, payload, caplog) == (not valid(parse, payload)), payload[:300]
        assert running(agent) == was
        if topic == T.desired(dev):  # dropped, refused or stale: always counted
            assert outcomes(agent) == before + 1

    run()
    calls = never_parsed(monkeypatch, Signed, Desired, ArtifactChunk, KeySet, Rebirth)
    for topic in kinds:
        assert feed(agent, topic, BIG, caplog) == 1 and calls == []


def test_agent_never_applies_a_desired_state_whose_signed_body_changed(loop, catalog, caplog):
    agent, trusted = healthy_agent(loop)
    dev, ctl = agent.cfg.device_id, loop.controller

    @fuzz(150)
    @given(MUTATION | st.tuples(st.just("body"), DOC_PLAN))
    def run(mutation):
        hybrid = next(e for e in catalog.hybrids if e.id != agent.slot.get().hybrid)
        front, back = ctl.artifacts.split(hybrid)
        gen = agent.applied + 1
        good = seal(Desired(device_id=dev, generation=gen, deployment_id=f"{dev}.fz{gen}",
                            hybrid=hybrid.id, front=front, back=back, ts=time.time(),
                            stitch=ctl.artifacts.delta(hybrid)), [trusted])
        if mutation[0] == "body":  # the signed body edited, its signature kept
            env = json.loads(good)
            body = mutate_doc(json.loads(env["body"]), mutation[1])[1]
            payload = dumps(env | {"body": json.dumps(body, separators=(",", ":"))})
        else:
            payload = mutate(good, mutation)
        before, was = outcomes(agent), running(agent)
        feed(agent, T.desired(dev), payload, caplog)
        assert outcomes(agent) == before + 1
        if still_signed(payload, good, trusted.id):  # e.g. whitespace, escapes, `v`
            assert agent.applied == gen, "a validly signed desired state was not applied"
        else:
            assert running(agent) == was, f"a tampered desired state was applied: {payload[:300]!r}"

    run()
    # the agent kept serving throughout
    assert len(agent.infer(np.zeros((2, 32, 32), np.uint8)).classes) == 2


def test_agent_refuses_mutated_key_sets_chunks_and_rebirths(loop, caplog):
    agent, trusted = healthy_agent(loop)
    dev, trust, was = agent.cfg.device_id, set(agent.keyring.keys), running(agent)
    blob = bytes(range(256)) * 20  # a download the agent is made to wait for: 5 chunks
    parts = codec.chunks(blob, 1024)

    @fuzz(200)
    @given(st.sampled_from(["keys", "chunk", "rebirth"]), st.integers(0, 4), MUTATION)
    def run(kind, k, mutation):
        agent.held, agent.pending, seq = None, None, agent.keyring.seq
        agent.cache.discard("f0" * 32)
        agent.fetching = {"f0" * 32: _Fetch(last_progress=agent.clock())}
        topic, cls, good = {
            "keys": (T.ctl_keys, KeySet, seal(keyset([trusted], seq + 1, time.time()), [trusted])),
            "chunk": (T.art_data(dev), ArtifactChunk, encode(ArtifactChunk(
                artifact="f0" * 32, index=k, total=len(parts), size=len(blob),
                artifact_sha256=codec.sha256_hex(blob), sha256=codec.sha256_hex(parts[k]),
                data=codec.b64(parts[k])))),
            "rebirth": (T.rebirth, Rebirth, encode(Rebirth(ts=time.time())))}[kind]
        payload = mutate(good, mutation)
        grew = feed(agent, topic, payload, caplog)
        assert running(agent) == was and set(agent.keyring.keys) == trust
        if not valid(lambda p: unverified(cls, p), payload):
            assert grew == 1, payload[:300]
        if kind == "keys":  # accepted only if the signed body is untouched
            signed = still_signed(payload, good, trusted.id)
            assert agent.keyring.seq == seq + signed and grew == (not signed)
        if kind == "chunk" and payload == good:
            assert k in agent.fetching["f0" * 32].held

    run()
    agent.fetching.clear()
    assert len(agent.infer(np.zeros((2, 32, 32), np.uint8)).classes) == 2


# ---- size limits and the artifact codec ---------------------------------------------------
def test_oversized_inputs_are_refused_before_parsing(monkeypatch):
    classes = (State, Telemetry, Ack, ArtifactRequest, ArtifactChunk, Rebirth, Desired, Signed,
               KeySet)
    calls = never_parsed(monkeypatch, *classes)
    for parse in [lambda p, c=c: decode(c, p) for c in classes] + [Keyring([]).accept]:
        with pytest.raises(ProtocolError, match=f"{len(BIG)} bytes exceeds"):
            parse(BIG)
    assert calls == []
    monkeypatch.setattr(codec, "base64", None)  # decoding would raise AttributeError
    monkeypatch.setattr(codec, "json", None)  # so would reading a header
    with pytest.raises(codec.ArtifactError, match="exceeds 1024 bytes"):
        codec.unb64("A" * 50_000_000, 1024)
    for n in [2**63, 2**64 - 1, codec.MAX_HEADER_BYTES + 1, 100]:  # huge, or past the blob
        with pytest.raises(codec.ArtifactError, match=f"header of {n} bytes"):
            codec.read_header(n.to_bytes(8, "little") + b"{}" * 10)


@fuzz(300)
@given(st.text(alphabet="ABCDab+/=09 \n-_*", max_size=40), st.integers(0, 30))
@example("AAAA", 1)  # 4 characters pass the length check for a limit of 1, and decode to 3 bytes
def test_unb64_never_returns_more_than_its_limit(text, limit):
    try:
        out = codec.unb64(text, limit)
    except codec.ArtifactError:
        return
    assert len(out) <= limit, f"unb64({text!r}, {limit}) returned {len(out)} bytes"


def test_read_header_refuses_shapes_whose_size_overflows():
    head = dumps({"t": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    with pytest.raises(codec.ArtifactError):  # 2**64 elements in 0 bytes (np.prod wraps to 0)
        codec.read_header(len(head).to_bytes(8, "little") + head)


TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32),
           "n": np.array(7, np.int64)}
SEGMENT = codec.pack_segment(TENSORS, {"recipe": {"model": "m"}, "index": 0})
DELTA = zlib.decompress(codec.pack_delta({k: TENSORS[k] for k in ("w", "b")}))


@fuzz(300)
@given(st.sampled_from(["segment", "delta"]), MUTATION)
def test_mutated_safetensors_are_refused_or_read_exactly(which, mutation):
    blob = SEGMENT if which == "segment" else DELTA
    n = int.from_bytes(blob[:8], "little")
    if mutation[0] == "bytes":
        m = mutate_bytes(blob, mutation[1])
    else:  # the JSON header mutated, its length fixed up
        head = dumps(mutate_doc(json.loads(blob[8:8 + n]), mutation[1])[1])
        m = len(head).to_bytes(8, "little") + head + blob[8 + n:]
    try:
        if which == "segment":
            tensors, _ = codec.unpack_segment(m, codec.sha256_hex(m))
        else:
            z = zlib.compress(m)
            tensors = codec.unpack_delta(z, codec.sha256_hex(z), {"w": (3, 4), "b": (3,)})
    except codec.ArtifactError:
        return
    n = int.from_bytes(m[:8], "little")  # accepted: each tensor is exactly the header's bytes
    for name, t in json.loads(m[8:8 + n]).items():
        if name != "__metadata__":
            a, b = t["data_offsets"]
            assert tensors[name].tobytes() == m[8 + n + a:8 + n + b]
            assert list(tensors[name].shape) == t["shape"]
    if m == blob:
        assert all(np.array_equal(tensors[k], TENSORS[k]) for k in tensors)


# ---- fleet.yaml ---------------------------------------------------------------------------
def load_or_refuse(file: Path, text: bytes):
    """A FleetPolicy, or a PolicyError whose problems each name a field or a line."""
    file.write_bytes(text)
    try:
        return load_policy(file)
    except PolicyError as exc:
        assert exc.problems and str(file) in str(exc)
        assert all(p.message and (p.field or p.line) for p in exc.problems), exc.problems
        return exc


KEYS = st.sampled_from(["catalog", "defaults", "groups", "devices", "rollout", "objective",
                        "constraints", "battery_modes", "below", "name", "match", "waves"])
DOCS = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(KEYS | st.text(max_size=8), kids, max_size=5),
                    max_leaves=20)


def test_random_fleet_yaml_loads_or_names_the_problem(tmp_path):
    @fuzz(200)
    @given(DOCS.map(lambda d: yaml.safe_dump(d).encode())
           | st.text(alphabet="{}[]:-,#&*!|>'\"%@ \n\tab01.", max_size=60).map(str.encode))
    @example(b"a: \x07\n")  # a character YAML does not allow
    @example(b"[" * 5000)  # nested too deep
    @example(b"catalog: \xff\n")  # not UTF-8
    @example(b"'[key]': null\n")  # a user key spelled like pydantic's marker for dict keys
    def run(text):
        load_or_refuse(tmp_path / "fleet.yaml", text)

    run()


def test_mutated_fleet_yaml_loads_or_names_the_field(tmp_path):
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "fleet.yaml").read_text())

    def name(path):
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")

    @fuzz(200)
    @given(DOC_PLAN)
    def run(plan):
        path, new = mutate_doc(doc, plan)
        out = load_or_refuse(tmp_path / "fleet.yaml", yaml.safe_dump(new).encode())
        if isinstance(out, PolicyError):  # the problem is where the mutation was
            at = name(path)
            assert any(at.startswith(p.field) or p.field.startswith(at) for p in out.problems), (
                at, str(out))
        else:
            assert isinstance(out, FleetPolicy) and out.catalog.is_absolute()

    run()
