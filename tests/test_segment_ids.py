"""Segment IDs (docs/protocol.md §5.3): the document's test vectors, a device that computes
them from an artifact's bytes with nothing but hashlib and json, and the old-scheme upgrade
paths (catalogs refused, device caches re-keyed)."""
import base64
import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe, tiny_segments
from device_agent.cache import SegmentCache, SegmentRegistry, artifact_segment_id
from fleet_protocol import codec
from stitch_lib.assemble import from_recipe
from stitch_lib.segment_ids import canonical_json, segment_id, segment_id_header
from stitch_lib.segments import split_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def section_5_3() -> str:
    text = DOC.read_text()
    return text[text.index("### 5.3 Segment ID"):text.index("### 5.4 ")]


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header_start`."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def code(cell: str) -> str:
    return cell.strip().strip("`")


def pattern(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The vectors' weights: element i (row-major) = (i mod 7) − 3, as the tensor's dtype."""
    return ((np.arange(int(np.prod(shape, dtype=np.int64))) % 7) - 3).astype(dtype).reshape(shape)


def test_the_hand_checkable_vector():
    sec = section_5_3()
    (recipe, index, _), = table_rows(sec, "| recipe | index | tensors |")
    header = re.search(r"The header \((\d+) bytes\):\n\n```json\n(.*?)\n```", sec, re.S)
    data_hex = re.findall(r"`([0-9a-f]{16})` \(`\w+`\)", sec)
    doc_id = re.search(r"→ segment ID\n`([0-9a-f]{64})`", sec).group(1)
    head = json.loads(header.group(2))
    tensors, offset, data = {}, 0, bytes.fromhex("".join(data_hex))
    for name, dtype, shape in head["tensors"]:  # the tensors, read back from header and bytes
        a = np.frombuffer(data, codec.DTYPES[dtype], int(np.prod(shape)), offset).reshape(shape)
        tensors[name], offset = a, offset + a.nbytes
    assert offset == len(data)
    assert tensors["w"].tolist() == [1.0, -2.0] and tensors["n"].tolist() == 7
    recipe = json.loads(code(recipe))
    assert segment_id_header(recipe, int(index), tensors) == header.group(2)
    assert len(header.group(2).encode()) == int(header.group(1))
    assert segment_id(recipe, int(index), tensors) == doc_id
    assert hashlib.sha256(header.group(2).encode() + b"\n" + data).hexdigest() == doc_id


def test_the_vectors_of_every_segment_kind():
    sec = section_5_3()
    rows = table_rows(sec, "| kind | recipe | index |")
    headers = re.search(r"The headers, in the table's order \(one per line\):\n\n```\n(.*?)\n```",
                        sec, re.S).group(1).splitlines()
    assert [r[0] for r in rows] == ["CNN stem", "CNN stage", "CNN head", "ViT stem",
                                    "ViT block", "ViT head"]
    assert len(headers) == len(rows)
    for (kind, recipe, index, name, length, header_sha, doc_id), header in zip(rows, headers):
        recipe, index = json.loads(code(recipe)), int(index)
        seg = split_model(from_recipe(recipe), recipe)[index]
        assert seg.name == code(name), kind
        tensors = {k: pattern(v.numpy().dtype, tuple(v.shape))
                   for k, v in seg.body.state_dict().items()}
        assert segment_id_header(recipe, index, tensors) == header, kind
        assert len(header.encode()) == int(length), kind
        assert hashlib.sha256(header.encode()).hexdigest() == code(header_sha), kind
        assert segment_id(recipe, index, tensors) == code(doc_id), kind
        seg.body.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
        assert seg.segment_id() == code(doc_id), kind  # the live segment: the same ID


def test_the_whole_artifact_vector():
    sec = section_5_3()
    doc_header = re.search(r"its header is\n`(.*?)`\n", sec).group(1)
    doc_id = re.search(r"and its segment ID `([0-9a-f]{64})`", sec).group(1)
    blob = base64.b64decode(re.search(r"complete 1 456-byte artifact.*?```\n(.*?)\n```",
                                      sec, re.S).group(1))
    tensors, meta = codec.unpack_segment(blob, codec.sha256_hex(blob))
    assert segment_id_header(meta["recipe"], meta["index"], tensors) == doc_header
    assert artifact_segment_id(tensors, meta) == foreign_segment_id(blob) == doc_id


def foreign_segment_id(blob: bytes) -> str:
    """§5.3 as a device in another language computes it: from the artifact's bytes, with a
    JSON parser and SHA-256 only (the recipe here has ASCII strings and integers, so the
    sorted compact dump is the JCS form)."""
    (n,) = struct.unpack("<Q", blob[:8])
    entries = json.loads(blob[8:8 + n])
    meta = json.loads(entries.pop("__metadata__")["restnet"])
    names = sorted(entries)
    header = {"scheme": 2, "recipe": meta["recipe"], "index": meta["index"],
              "tensors": [[k, entries[k]["dtype"], entries[k]["shape"]] for k in names]}
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = hashlib.sha256(text.encode("utf-8") + b"\n")
    for k in names:
        begin, end = entries[k]["data_offsets"]
        h.update(blob[8 + n + begin:8 + n + end])
    return h.hexdigest()


@pytest.mark.parametrize("name", ["test_resnet", "vit"])
def test_a_foreign_device_computes_the_same_id_from_the_artifact(name):
    recipe = tiny_recipe(name)
    for s in tiny_segments(name):
        tensors = {k: v.numpy() for k, v in s.body.state_dict().items()}
        blob = codec.pack_segment(tensors, {"recipe": recipe, "index": s.index, "name": s.name})
        assert foreign_segment_id(blob) == s.segment_id() == segment_id(recipe, s.index, tensors)


def test_canonical_json_is_rfc_8785():
    numbers = {  # IEEE-754 bits → ECMAScript's text (checked against node's JSON.stringify)
        "0000000000000000": "0", "8000000000000000": "0", "0000000000000001": "5e-324",
        "8000000000000001": "-5e-324", "7fefffffffffffff": "1.7976931348623157e+308",
        "4340000000000000": "9007199254740992", "4430000000000000": "295147905179352830000",
        "44b52d02c7e14af5": "9.999999999999997e+22", "44b52d02c7e14af6": "1e+23",
        "3eb0c6f7a0b5ed8d": "0.000001", "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
        "41b3de4355555555": "333333333.3333333", "444b1ae4d6e2ef4f": "999999999999999900000",
        "444b1ae4d6e2ef50": "1e+21", "4010000000000000": "4", "3fb999999999999a": "0.1"}
    for bits, text in numbers.items():
        assert canonical_json(struct.unpack(">d", bytes.fromhex(bits))[0]) == text, bits
    keys = {"\u20ac": 1, "\r": 2, "1": 3, "\U0001f600": 4, "\u0080": 5, "\u00f6": 6,
            "\ufb33": 7}  # RFC 8785 §3.2.3: UTF-16 code unit order
    assert canonical_json(keys) == '{"\\r":2,"1":3,"\u0080":5,"\u00f6":6,"\u20ac":1,' \
                                   '"\U0001f600":4,"\ufb33":7}'
    assert canonical_json(["\u0007\n\"\\/é", True, None, [], {}]) == \
        '["\\u0007\\n\\"\\\\/é",true,null,[],{}]'
    for bad in (float("nan"), float("inf"), 2 ** 53 + 1, {1: 2}, {"a": {1, 2}}, b"x"):
        with pytest.raises(ValueError):
            canonical_json(bad)


def test_bad_recipes_and_tensors_are_refused():
    r, t = tiny_recipe("test_resnet"), {"w": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="exactly the keys"):
        segment_id({"model": "m"}, 0, t)
    with pytest.raises(ValueError, match=r"recipe\['num_classes'\] must be of type int"):
        segment_id(r | {"num_classes": "10"}, 0, t)
    with pytest.raises(ValueError, match="index must be an integer"):
        segment_id(r, -1, t)
    with pytest.raises(ValueError, match="float64 is not one segments are shipped in"):
        segment_id(r, 0, {"w": np.zeros(2)})
    assert segment_id(r, 0, {"w": torch.zeros(2)}) == segment_id(r, 0, t)  # tensors or arrays


def pack(s, recipe) -> bytes:
    return codec.pack_segment({k: v.numpy() for k, v in s.body.state_dict().items()},
                              {"recipe": recipe, "index": s.index, "name": s.name})


@torch.no_grad()
def test_the_registry_rebuilds_only_the_segment_the_artifact_hashes_to():
    recipe, segs = tiny_recipe("vit"), tiny_segments("vit")
    blob = pack(segs[1], recipe)
    x = torch.randn(2, 5, 32)
    with pytest.raises(codec.ArtifactError, match="does not rebuild segment"):
        SegmentRegistry().get(segs[2].segment_id(), lambda: blob)
    rebuilt = SegmentRegistry().get(segs[1].segment_id(), lambda: blob)
    assert torch.equal(rebuilt(x), segs[1](x))
    no_recipe = codec.pack_segment({k: v.numpy() for k, v in segs[1].body.state_dict().items()},
                                   {"index": 1})
    with pytest.raises(codec.ArtifactError, match="no valid recipe and index"):
        SegmentRegistry().get(segs[1].segment_id(), lambda: no_recipe)


def test_a_cache_of_the_old_scheme_is_re_keyed_once(tmp_path):
    recipe, segs = tiny_recipe("test_resnet"), tiny_segments("test_resnet")
    old, junk = "ab" * 32, "cd" * 32  # scheme-1 names
    (tmp_path / "segments").mkdir(parents=True)
    (tmp_path / "segments" / f"{old}.safetensors").write_bytes(pack(segs[0], recipe))
    (tmp_path / "segments" / f"{junk}.safetensors").write_bytes(b"not an artifact")
    (tmp_path / "partial" / old).mkdir(parents=True)
    (tmp_path / "partial" / old / "0.part").write_bytes(b"x")
    cache = SegmentCache(tmp_path)
    assert cache.ids() == [segs[0].segment_id()]  # renamed; the junk dropped
    assert not any((tmp_path / "partial").iterdir())
    assert (tmp_path / "id-scheme").read_text().strip() == "2"
    (tmp_path / "partial" / "ef").mkdir()  # a download begun under the new scheme
    SegmentCache(tmp_path)  # marked: nothing is touched again
    assert (tmp_path / "partial" / "ef").is_dir()
