"""Ed25519 signatures on what the controller tells devices: desired states and key sets.

A signed message is an envelope whose signatures cover the exact UTF-8 bytes of `body`, the
JSON text of the inner message, so no canonical JSON is needed and a device written in another
language verifies the bytes it received:

    {"v": 1, "kind": "signed", "body": "{\\"kind\\":\\"desired\\", ...}",
     "sigs": [{"key": "<key id>", "sig": "<base64 Ed25519 signature of body>"}]}

A key's ID is the first 16 hex digits of the sha256 of its 32 raw public-key bytes. Devices
trust the keys of a `Keyring`: the controller's public key at provisioning, then whatever a
`KeySet` signed by an already trusted key says (retained on `ctl/keys`), which is how keys
rotate while the fleet keeps running.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from .files import write_file
from .messages import MAX_COUNTER, MAX_MESSAGE_BYTES, M, ProtocolError, Wire, decode, encode

KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class SignatureError(ProtocolError):
    """A message whose signature fails, or that no trusted key signed."""


class UntrustedKey(SignatureError):
    """Signed, but by no key the device trusts (yet: a key set may introduce it)."""


class Sig(Wire):
    key: KeyId
    sig: str = Field(max_length=128)  # base64 of 64 bytes


class Signed(Wire):
    kind: Literal["signed"] = "signed"
    body: str = Field(max_length=MAX_MESSAGE_BYTES)
    sigs: list[Sig] = Field(min_length=1, max_length=8)


class PublicKey(Wire):
    key: KeyId
    raw: str = Field(max_length=64)  # base64 of the 32 raw public-key bytes


class KeySet(Wire):
    """The keys devices should trust from now on; accepted only if `seq` is newer."""

    kind: Literal["keyset"] = "keyset"
    seq: int = Field(ge=1, le=MAX_COUNTER)
    keys: list[PublicKey] = Field(min_length=1, max_length=8)
    ts: float


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """The controller's private key (PKCS#8 PEM on disk, mode 0600)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.id = key_id(self.public)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except ValueError as exc:
            raise ValueError(f"{path}: not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key; make one with `restnet keys init`")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the private key (0600) and, beside it, the public key as `<name>.pub`."""
        path = Path(path)
        pem = self.private.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        write_file(path, pem, 0o600)
        write_file(path.with_suffix(".pub"), public_pem(self.public), 0o644)

    def sign(self, data: bytes) -> Sig:
        return Sig(key=self.id, sig=base64.b64encode(self.private.sign(data)).decode())


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file (`controller.pub`, as `restnet keys init` writes it)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def seal(msg: Wire, keys: list[SigningKey]) -> bytes:
    """`msg` in a signed envelope, signed by every key in `keys`."""
    body = encode(msg)
    return encode(Signed(body=body.decode(), sigs=[k.sign(body) for k in keys]))


def keyset(keys: list[SigningKey], seq: int, ts: float) -> KeySet:
    return KeySet(seq=seq, ts=ts, keys=[
        PublicKey(key=k.id, raw=base64.b64encode(_raw(k.public)).decode()) for k in keys])


def unverified(cls: type[M], payload: bytes) -> tuple[Signed | None, M]:
    """Parse an envelope and its body WITHOUT checking signatures (see `Keyring.verify`);
    a bare, unsigned `cls` message comes back with envelope None, so it can be refused by name."""
    try:
        env = decode(Signed, payload)
    except ProtocolError:
        return None, decode(cls, payload)
    return env, decode(cls, env.body.encode())


class Keyring:
    """The public keys a device trusts, and the newest key set it accepted."""

    def __init__(self, keys: list[Ed25519PublicKey], seq: int = 0) -> None:
        self.keys = {key_id(k): k for k in keys}
        self.seq = seq

    def verify(self, env: Signed | None) -> None:
        """Raise SignatureError unless a trusted key signed `env.body`."""
        if env is None:
            raise SignatureError("not signed")
        body = env.body.encode()
        known = [s for s in env.sigs if s.key in self.keys]
        if not known:
            raise UntrustedKey(f"signed by untrusted key(s) {[s.key for s in env.sigs]}")
        for s in known:
            try:
                self.keys[s.key].verify(base64.b64decode(s.sig, validate=True), body)
                return
            except (InvalidSignature, binascii.Error, ValueError):
                continue
        raise SignatureError(f"bad signature by key {known[0].key} (tampered or forged)")

    def open(self, cls: type[M], payload: bytes) -> M:
        """Parse, verify and return the signed `cls` message in `payload`."""
        env, msg = unverified(cls, payload)
        self.verify(env)
        return msg

    def accept(self, payload: bytes) -> bool:
        """Adopt a signed key set if a trusted key signed it and it is newer; True if the
        trusted keys changed (a controller re-announcing the same keys changes only `seq`)."""
        ks = self.open(KeySet, payload)
        if ks.seq <= self.seq:
            return False
        keys = []
        for k in ks.keys:
            try:
                pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(k.raw, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise SignatureError(f"key set holds a malformed key {k.key}: {exc}") from None
            if key_id(pub) != k.key:
                raise SignatureError(f"key set: key {k.key} does not match its bytes")
            keys.append(pub)
        new = {key_id(k): k for k in keys}
        changed = new.keys() != self.keys.keys()
        self.keys, self.seq = new, ks.seq
        return changed

    def to_json(self) -> bytes:
        return json.dumps({"seq": self.seq, "keys": [
            base64.b64encode(_raw(k)).decode() for k in self.keys.values()]}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Keyring:
        doc = json.loads(data)
        return cls([Ed25519PublicKey.from_public_bytes(base64.b64decode(k)) for k in doc["keys"]],
                   int(doc["seq"]))


class KeyDir:
    """The controller's key directory: `controller.key` signs; `previous/*.key` are keys being
    rotated out, still announced as trusted (and signing key sets) until retired; `keyset.seq`
    numbers the key set they make (one more at every init, rotate and retire)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def current_path(self) -> Path:
        return self.root / "controller.key"

    @property
    def seq_path(self) -> Path:
        return self.root / "keyset.seq"

    def init(self) -> SigningKey:
        if self.current_path.exists():
            raise FileExistsError(f"{self.current_path} exists; rotate it with "
                                  "`restnet keys rotate`")
        key = SigningKey.generate()
        key.save(self.current_path)
        self._next_seq()
        return key

    def seq(self) -> int:
        """The key set's sequence number (KeySet.seq), persisted with the keys. A directory
        made before the counter existed starts it, once, at the Unix time in milliseconds:
        above any key set the controller published then (which used that clock)."""
        try:
            text = self.seq_path.read_text()
        except FileNotFoundError:
            if not self.current_path.exists():
                raise FileNotFoundError(f"no signing key at {self.current_path}; make one "
                                        f"with `restnet keys init {self.root}`") from None
            return self._write_seq(int(time.time() * 1000))
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{self.seq_path}: expected an integer, found {text[:40]!r}") from None
        if not 1 <= value <= MAX_COUNTER:
            raise ValueError(f"{self.seq_path}: {value} is outside 1..{MAX_COUNTER}")
        return value

    def _next_seq(self) -> int:
        """Count one more key set (called after the key files changed)."""
        return self._write_seq(self.seq() + 1 if self.seq_path.exists() else 1)

    def _write_seq(self, value: int) -> int:
        write_file(self.seq_path, f"{value}\n".encode(), 0o644)
        return value

    def load(self) -> tuple[SigningKey, list[SigningKey]]:
        """(the signing key, the keys being rotated out)."""
        if not self.current_path.exists():
            raise FileNotFoundError(f"no signing key at {self.current_path}; make one with "
                                    f"`restnet keys init {self.root}`")
        previous = sorted((self.root / "previous").glob("*.key"))
        return SigningKey.load(self.current_path), [SigningKey.load(p) for p in previous]

    def rotate(self) -> SigningKey:
        """Move the signing key to `previous/` and make a new one."""
        old, previous = self.load()
        if len(previous) >= 7:  # a key set is signed by every key held: at most 8
            raise ValueError(f"{len(previous)} keys are already being rotated out; "
                             "`restnet keys retire` them first")
        self.seq()  # a directory from before the counter gets one now, before the key changes
        old.save(self.root / "previous" / f"{old.id}.key")
        self.current_path.unlink()
        return self.init()

    def retire(self) -> list[str]:
        """Forget the keys being rotated out; returns their IDs."""
        gone = []
        for p in sorted((self.root / "previous").glob("*.key")):
            gone.append(p.stem)
            p.unlink()
            p.with_suffix(".pub").unlink(missing_ok=True)
        if gone:
            self._next_seq()
        return gone

    def stamp(self) -> tuple[float, ...]:
        """Changes whenever a key file is added, replaced or removed (for reloading)."""
        files = [self.current_path, self.seq_path,
                 *sorted((self.root / "previous").glob("*.key"))]
        return tuple(p.stat().st_mtime_ns for p in files if p.exists()) + (len(files),)
