"""Every MQTT topic of the fleet, in one place (DESIGN §4).

All topics hang under a configurable root (default `fleet/v1`). Every ID is exactly one topic
level and may not contain `+`, `#` or `/`, so a publish topic never contains a wildcard and
the subscription filters below match exactly the topics they are meant for.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROOT = "fleet/v1"
_FORBIDDEN = set("+#/") | {"\x00"}


def check_id(value: str, what: str = "device ID") -> str:
    """Return `value` if it is a valid single topic level, else raise ValueError."""
    if not value or _FORBIDDEN & set(value) or len(value.encode()) > 128:
        raise ValueError(f"{what} {value!r} must be 1-128 bytes without '+', '#', '/' or NUL")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic builders and subscription filters under one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or self.root.endswith("/") or (_FORBIDDEN - {"/"}) & set(self.root):
            raise ValueError(f"topic root {self.root!r} must be non-empty, without wildcards "
                             "or a trailing '/'")

    # device → controller
    def state(self, device: str) -> str:
        return f"{self.root}/dev/{check_id(device)}/state"

    def telemetry(self, device: str) -> str:
        return f"{self.root}/dev/{check_id(device)}/telemetry"

    def ack(self, device: str) -> str:
        return f"{self.root}/dev/{check_id(device)}/ack"

    def art_req(self, device: str) -> str:
        return f"{self.root}/art/{check_id(device)}/req"

    # controller → device
    def desired(self, device: str) -> str:
        return f"{self.root}/dev/{check_id(device)}/desired"

    def art_data(self, device: str) -> str:
        return f"{self.root}/art/{check_id(device)}/data"

    @property
    def ctl_state(self) -> str:
        return f"{self.root}/ctl/state"

    @property
    def ctl_keys(self) -> str:
        return f"{self.root}/ctl/keys"

    @property
    def rebirth(self) -> str:
        return f"{self.root}/bcast/rebirth"

    # subscription filters
    @property
    def all_state(self) -> str:
        return f"{self.root}/dev/+/state"

    @property
    def all_telemetry(self) -> str:
        return f"{self.root}/dev/+/telemetry"

    @property
    def all_ack(self) -> str:
        return f"{self.root}/dev/+/ack"

    @property
    def all_art_req(self) -> str:
        return f"{self.root}/art/+/req"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(kind, device) for a per-device topic under this root, e.g. ("telemetry", "d1");
        None for anything else."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) != 3 or not parts[1]:
            return None
        group, device, leaf = parts
        if group == "dev" and leaf in ("state", "telemetry", "ack", "desired"):
            return leaf, device
        if group == "art" and leaf in ("req", "data"):
            return f"art_{leaf}", device
        return None


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (`+` one level, `#` the rest)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for k, part in enumerate(f):
        if part == "#":
            return True
        if k >= len(t) or (part != "+" and part != t[k]):
            return False
    return len(f) == len(t)
