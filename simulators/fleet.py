"""A simulated fleet: many REAL device agents on one ClientHost (one thread), each with its own
simulated resources and link, driven through a scenario of resource changes over time.

Segments are provisioned once into a master cache and hard-linked into every device's cache,
and rebuilt segment modules are shared read-only by all agents through one SegmentRegistry.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from device_agent.agent import Agent, AgentConfig
from device_agent.cache import SegmentCache, SegmentRegistry, provision
from fleet_protocol.mqtt import ClientHost, parse_url
from fleet_protocol.topics import Topics
from stitch_lib.catalog import Catalog

from .devices import SimResources, SimState, make_fleet, with_changes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the scenario starts
    set: dict  # SimState fields to change
    classes: tuple[str, ...] = ()  # select by device class (empty: all) ...
    devices: tuple[str, ...] = ()  # ... or by device ID
    fraction: float = 1.0  # ... then a seeded random share of those
    cut_s: float = 0.0  # a partition: the chosen devices lose their link for this long


@dataclass(frozen=True)
class Scenario:
    duration_s: float
    events: tuple[Event, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        """Validate a parsed scenario file; errors name the event and the field."""
        allowed = {"at", "set", "classes", "devices", "fraction", "cut_s"}
        events = []
        for k, e in enumerate(d.get("events") or []):
            bad = set(e) - allowed
            if bad:
                raise ValueError(f"events[{k}]: unknown key(s) {sorted(bad)}; allowed: "
                                 f"{sorted(allowed)}")
            with_changes(SimState(), e.get("set", {}))  # names the unknown field, if any
            events.append(Event(at=float(e["at"]), set=dict(e.get("set", {})),
                                classes=tuple(e.get("classes", ())),
                                devices=tuple(e.get("devices", ())),
                                fraction=float(e.get("fraction", 1.0)),
                                cut_s=float(e.get("cut_s", 0.0))))
        return cls(float(d["duration_s"]), tuple(sorted(events, key=lambda e: e.at)))


@dataclass
class SimDevice:
    id: str
    res: SimResources
    agent: Agent
    down_until: float = 0.0  # monotonic time the device's partition heals


@dataclass
class SimFleet:
    """`n` simulated devices of mixed classes against the broker at `url`."""

    n: int
    url: str
    catalog_dir: Path
    workdir: Path
    mix: dict[str, float] | None = None
    telemetry_period: float = 2.0
    provisioned: bool = True  # devices start holding every segment of the catalog
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: int = 0
    trust: tuple = ()  # the controller's public keys, as each agent is provisioned with them
    topics: Topics = field(default_factory=Topics)
    host: ClientHost = field(default_factory=ClientHost)
    devices: list[SimDevice] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def __post_init__(self) -> None:
        self.registry = SegmentRegistry()
        self.rng = random.Random(self.seed)
        master = SegmentCache(self.workdir / "master")
        if self.provisioned:
            provision(master, Catalog.load(self.catalog_dir))
        for dev_id, res in make_fleet(self.n, self.mix, self.seed):
            cache_dir = self.workdir / "devices" / dev_id
            cache = SegmentCache(cache_dir)
            for seg_id in master.ids():  # hard links: one copy on disk for the whole fleet
                if not cache.has(seg_id):
                    os.link(master.path(seg_id), cache.path(seg_id))
            cfg = AgentConfig(dev_id, cache_dir, self.topics, self.telemetry_period,
                              probe=self.probe, trust=self.trust)
            agent = Agent(cfg, res, self.host, self.registry)
            self.devices.append(SimDevice(dev_id, res, agent))

    def start(self, credentials: Mapping[str, str] | None = None, pace: int = 25) -> None:
        """Connect every agent, `pace` at a time (the broker's listen backlog is 100), each
        logging in as its device ID with its password in `credentials` (None: anonymous)."""
        host, port = parse_url(self.url)
        for k, d in enumerate(self.devices):
            if credentials is not None:
                d.agent.cfg.username, d.agent.cfg.password = d.id, credentials[d.id]
            d.agent.start(host, port)
            self._link(d)
            if k % pace == pace - 1:
                self.host.run_once(0.01)

    def _link(self, d: SimDevice) -> None:
        """The device's link: what it receives arrives after the link latency and transfer
        time; a share of the QoS 0 messages it sends or receives (telemetry) is lost; while
        the device is cut off nothing arrives and it cannot connect."""
        client = d.agent.client
        handler, reconnect, publish = client.on_message, client.reconnect, client.publish
        cls = d.res.cls

        def lost(qos: int) -> bool:
            return qos == 0 and d.res.rng.random() < cls.link_loss + d.res.state.extra_loss

        def send(topic, payload=None, qos=0, retain=False, properties=None):
            if lost(qos):
                return None  # the agent ignores what publish() returns
            return publish(topic, payload, qos, retain, properties)

        def connect():
            if time.monotonic() < d.down_until:
                raise OSError("simulated partition")
            return reconnect()

        def deliver(client, userdata, msg) -> None:
            st = d.res.state  # scenarios replace it: read it at each message
            if time.monotonic() < d.down_until or lost(msg.qos):
                return
            delay = (cls.link_ms * st.link_factor + len(msg.payload) * 8 / cls.link_kbps) / 1e3
            self.host.call_later(delay, lambda: handler(client, userdata, msg))

        client.on_message = deliver
        client.reconnect = connect
        client.publish = send

    def cut(self, devices: list[SimDevice], seconds: float) -> None:
        """Partition `devices` for `seconds`: their connections drop (the broker publishes their
        wills) and reconnects fail until the link heals."""
        until = time.monotonic() + seconds
        for d in devices:
            d.down_until = until
            sock = d.agent.client.socket() if d.agent.client else None
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

    def select(self, e: Event) -> list[SimDevice]:
        chosen = [d for d in self.devices
                  if (not e.classes or d.res.cls.name in e.classes)
                  and (not e.devices or d.id in e.devices)]
        if e.fraction < 1.0:
            chosen = self.rng.sample(chosen, round(e.fraction * len(chosen)))
        return chosen

    def apply(self, e: Event) -> list[str]:
        """Apply a scenario event now; returns the IDs of the devices it changed."""
        chosen = self.select(e)
        for d in chosen:
            d.res.state = with_changes(d.res.state, e.set)
        if e.cut_s:
            self.cut(chosen, e.cut_s)
        log.info("scenario @%.0fs: %s%s on %d devices", e.at, e.set,
                 f", cut off for {e.cut_s:.0f} s" if e.cut_s else "", len(chosen))
        return [d.id for d in chosen]

    def run(self, scenario: Scenario, on_tick=None, tick_s: float = 1.0) -> None:
        """Run the scenario in real time; `on_tick(elapsed)` is called every `tick_s`."""
        t0 = time.monotonic()
        pending = list(scenario.events)
        next_tick = 0.0
        while (elapsed := time.monotonic() - t0) < scenario.duration_s:
            while pending and pending[0].at <= elapsed:
                self.apply(pending.pop(0))
            if on_tick is not None and elapsed >= next_tick:
                on_tick(elapsed)
                next_tick += tick_s
            self.host.run_once(0.05)

    def stop(self) -> None:
        for d in self.devices:
            d.agent.stop()
        self.host.run(timeout=0.5)
