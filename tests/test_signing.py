"""Ed25519 envelopes, key sets and the key directory, without a broker."""
import json
import stat

import pytest

from fleet_protocol.messages import Desired
from fleet_protocol.signing import (KeyDir, Keyring, SignatureError, SigningKey, UntrustedKey,
                                    keyset, load_public, seal, unverified)

SEG = "ab" * 32


def desired(**kw):
    return Desired(**({"device_id": "d1", "generation": 3, "deployment_id": "d1.3",
                       "hybrid": "h", "front": [SEG], "ts": 1.0} | kw))


def test_a_sealed_message_opens_only_with_a_trusted_key_and_an_untouched_body():
    key, other = SigningKey.generate(), SigningKey.generate()
    payload = seal(desired(), [key])
    assert Keyring([key.public]).open(Desired, payload) == desired()
    with pytest.raises(UntrustedKey):
        Keyring([other.public]).open(Desired, payload)
    env = json.loads(payload)
    env["body"] = env["body"].replace('"generation":3', '"generation":4')
    with pytest.raises(SignatureError, match="bad signature"):
        Keyring([key.public]).open(Desired, json.dumps(env).encode())
    bare = desired().model_dump_json().encode()
    assert unverified(Desired, bare)[0] is None  # recognised, so it can be refused by name
    with pytest.raises(SignatureError, match="not signed"):
        Keyring([key.public]).open(Desired, bare)


def test_a_key_set_is_adopted_only_if_trusted_and_newer():
    old, new, stranger = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    ring = Keyring([old.public])
    with pytest.raises(UntrustedKey):
        ring.accept(seal(keyset([stranger], 5, 0.0), [stranger]))
    assert ring.accept(seal(keyset([old, new], 5, 0.0), [old]))
    assert set(ring.keys) == {old.id, new.id} and ring.seq == 5
    assert not ring.accept(seal(keyset([new], 4, 0.0), [new]))  # older: ignored
    assert not ring.accept(seal(keyset([old, new], 6, 0.0), [new]))  # same keys: only seq
    assert ring.seq == 6
    assert ring.accept(seal(keyset([new], 7, 0.0), [new]))
    assert set(Keyring.from_json(ring.to_json()).keys) == {new.id}


def test_key_directory_init_rotate_retire(tmp_path):
    kd = KeyDir(tmp_path / "keys")
    first = kd.init()
    assert stat.S_IMODE(kd.current_path.stat().st_mode) == 0o600
    assert load_public(kd.current_path.with_suffix(".pub")).public_bytes_raw() == \
        first.public.public_bytes_raw()
    with pytest.raises(FileExistsError, match="rotate"):
        kd.init()
    stamp = kd.stamp()
    second = kd.rotate()
    current, retiring = kd.load()
    assert current.id == second.id and [k.id for k in retiring] == [first.id]
    assert kd.stamp() != stamp
    assert kd.retire() == [first.id] and kd.load()[1] == []


def test_keys_command(tmp_path, capsys):
    from restnet.cli import main

    d = str(tmp_path / "k")
    assert main(["keys", "init", d]) == 0
    assert "controller.pub" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="rotate it"):
        main(["keys", "init", d])
    assert main(["keys", "rotate", d]) == 0 and main(["keys", "show", d]) == 0
    assert main(["keys", "retire", d, "--force"]) == 0
    assert "being rotated out: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="restnet keys init"):
        main(["keys", "show", str(tmp_path / "none")])


def test_retire_waits_for_every_device_to_have_the_new_keys(tmp_path, capsys):
    from fleet_controller.cli import keys_main
    from fleet_controller.store import Store

    kd = KeyDir(tmp_path / "keys")
    kd.init()
    kd.rotate()
    store = Store(tmp_path / "ctl" / "controller.sqlite")
    store.put_meta("keys", {"ids": ["a", "b"], "since": 10})
    store.put_twin("cam-1", {"device_id": "cam-1", "keys_seq": 10})
    store.put_twin("cam-2", {"device_id": "cam-2", "keys_seq": 5})  # missed the new set
    args = ["retire", str(kd.root), "--state-dir", str(tmp_path / "ctl")]
    with pytest.raises(SystemExit, match=r"1 devices .*cam-2"):
        keys_main(args)
    assert len(kd.load()[1]) == 1  # nothing retired
    store.put_twin("cam-2", {"device_id": "cam-2", "keys_seq": 11})
    store.close()
    assert keys_main(args) == 0 and kd.load()[1] == []
