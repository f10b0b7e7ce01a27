import json

import numpy as np
import pytest

from fleet_protocol import codec
from fleet_protocol.messages import (Ack, ArtifactChunk, ArtifactRequest, ControllerState,
                                     Desired, ProtocolError, Rebirth, State, Telemetry, decode,
                                     encode)
from fleet_protocol.topics import Topics, check_id, matches

T = Topics()


def test_every_publish_topic_is_wildcard_free_and_matches_its_filter():
    d = "dev-001"
    pairs = [(T.state(d), T.all_state), (T.telemetry(d), T.all_telemetry),
             (T.ack(d), T.all_ack), (T.art_req(d), T.all_art_req),
             (T.desired(d), T.desired(d)), (T.art_data(d), T.art_data(d)),
             (T.ctl_state, T.ctl_state), (T.rebirth, T.rebirth)]
    for topic, flt in pairs:
        assert not set("+#") & set(topic), topic
        assert matches(flt, topic)
    assert not matches(T.all_state, T.telemetry(d))
    assert not matches(T.all_telemetry, T.state(d))
    assert not matches(T.all_state, "fleet/v1/dev/a/b/state")
    assert T.parse(T.telemetry(d)) == ("telemetry", d)
    assert T.parse(T.art_req(d)) == ("art_req", d)
    assert T.parse("other/v1/dev/x/state") is None and T.parse(T.ctl_state) is None


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 200])
def test_ids_are_one_topic_level(bad):
    with pytest.raises(ValueError, match="must be 1-128 bytes"):
        check_id(bad)
    with pytest.raises(ValueError):
        T.state(bad)


def test_messages_round_trip_and_ignore_unknown_fields():
    msgs = [State(device_id="d1", online=True, session=5, ts=1.0, segments=["a" * 64]),
            Telemetry(seq=1, ts=1.0, cpu=0.5, mem_free_mb=100, battery=0.3, temp_c=40),
            Ack(device_id="d1", deployment_id="dep1", generation=2, status="HEALTHY", ts=2.0),
            ArtifactRequest(artifact="5e" * 32, chunks=[0, 3]),
            ControllerState(online=True, session=1, ts=0.0), Rebirth(ts=0.0)]
    for m in msgs:
        assert decode(type(m), encode(m)) == m
        newer = json.loads(encode(m)) | {"field_from_the_future": [1, 2], "v": 2}
        assert decode(type(m), json.dumps(newer).encode()).model_dump(exclude={"v"}) == \
            m.model_dump(exclude={"v"})


@pytest.mark.parametrize("payload,fragment", [
    (b"not json", "invalid Telemetry"),
    (b'{"seq": -1, "ts": 1, "cpu": 0.1, "mem_free_mb": 1, "temp_c": 1}', "seq"),
    (b'{"seq": 1, "ts": 1, "cpu": 7, "mem_free_mb": 1, "temp_c": 1}', "cpu"),
    (b'{"kind": "ack", "seq": 1, "ts": 1, "cpu": 0.1, "mem_free_mb": 1, "temp_c": 1}', "kind"),
    (b"x" * 300_000, "exceeds"),
])
def test_bad_payloads_raise_a_short_reason(payload, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        decode(Telemetry, payload)


def test_delta_codec_checks_hash_and_shapes():
    w = {"proj.weight": np.random.randn(8, 4, 1, 1).astype(np.float32),
         "proj.bias": np.zeros(8, np.float32)}
    blob = codec.pack_delta(w)
    sha = codec.sha256_hex(blob)
    shapes = {k: v.shape for k, v in w.items()}
    out = codec.unpack_delta(blob, sha, shapes)
    assert np.allclose(out["proj.weight"], w["proj.weight"], atol=1e-2)
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 1
    with pytest.raises(codec.ArtifactError, match="sha256 mismatch"):
        codec.unpack_delta(bytes(tampered), sha, shapes)
    with pytest.raises(codec.ArtifactError, match="expected"):
        codec.unpack_delta(blob, sha, {"proj.weight": (8, 5, 1, 1), "proj.bias": (8,)})
    junk = b"\x00" * 100
    with pytest.raises(codec.ArtifactError, match="zlib"):
        codec.unpack_delta(junk, codec.sha256_hex(junk), shapes)
    bomb = __import__("zlib").compress(b"\x00" * (20 * 1024 * 1024))
    with pytest.raises(codec.ArtifactError, match="decompresses to more"):
        codec.unpack_delta(bomb, codec.sha256_hex(bomb), shapes)


def test_segment_artifact_and_chunks():
    w = {"0.weight": np.ones((3, 3), np.float32)}
    blob = codec.pack_segment(w, {"model": "test_resnet", "index": 1})
    parts = codec.chunks(blob, 16)
    assert b"".join(parts) == blob and all(len(p) == 16 for p in parts[:-1])
    tensors, meta = codec.unpack_segment(blob, codec.sha256_hex(blob))
    assert meta == {"model": "test_resnet", "index": 1} and np.array_equal(tensors["0.weight"], w["0.weight"])
    with pytest.raises(codec.ArtifactError, match="mismatch"):
        codec.unpack_segment(blob + b"x", codec.sha256_hex(blob))
    chunk = ArtifactChunk(artifact="5e" * 32, index=0, total=1, size=len(blob),
                          artifact_sha256=codec.sha256_hex(blob), sha256=codec.sha256_hex(blob),
                          data=codec.b64(blob))
    assert codec.unb64(chunk.data, 10**6) == blob
    with pytest.raises(codec.ArtifactError, match="exceeds"):
        codec.unb64(chunk.data, 10)


def test_desired_requires_a_generation_and_segments():
    with pytest.raises(ProtocolError, match="generation"):
        decode(Desired, b'{"device_id": "a", "generation": 0, "deployment_id": "d", "hybrid": "h", "front": [], "ts": 1}')


def test_a_pickle_is_never_loaded_as_weights():
    """torch.save output (a pickle that could run code) in place of an artifact is refused by
    the header check, before any loader sees it; no code path from the wire unpickles."""
    import ast
    import io
    from pathlib import Path

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    blob = buf.getvalue()
    with pytest.raises(codec.ArtifactError, match="safetensors"):
        codec.unpack_segment(blob, codec.sha256_hex(blob))
    with pytest.raises(codec.ArtifactError, match="safetensors"):
        codec.read_header(blob)
    root = Path(__file__).resolve().parents[1]
    for package in ("fleet_protocol", "device_agent", "fleet_controller", "simulators"):
        for path in (root / package).glob("*.py"):
            calls = {f"{n.func.value.id}.{n.func.attr}" for n in ast.walk(ast.parse(
                path.read_text())) if isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)}
            assert not calls & {"torch.load", "pickle.load", "pickle.loads"}, path
