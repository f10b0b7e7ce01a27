"""A simulated fleet: many REAL device agents on one ClientHost (one thread), each with its own
simulated resources and link, driven through a scenario of resource changes over time.

A device starts holding the segments of the anchors its class is provisioned with (the
scenario's `provision`; every anchor when it has none), and serving the first of them from its
start, as a flashed board does (its boot record; none when the scenario has no `provision`):
segments and each class's boot record are written once into a master cache and hard-linked
into each such device's cache. Any other segment a deployment needs, the device fetches from
the controller as chunks, into a copy of its own. Rebuilt segment modules are shared read-only
by all agents through one SegmentRegistry.

Served accuracy is accounted here, from the simulator's truth, every tick of `run`: for each
device, which catalog model serves and whether its true p95 is within the device's budget —
for the real agents, and for any other way of choosing (`choosers`: an oracle, a static
model) judged by the same truth.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from device_agent.agent import Agent, AgentConfig
from device_agent.cache import (BOOT_FILE, SegmentCache, SegmentRegistry, boot_model, provision,
                                write_boot)
from device_agent.worker import InlineWorker
from fleet_runtime.mqtt import ClientHost, parse_url
from fleet_protocol.topics import Topics
from stitch_lib.catalog import Catalog, Entry

from .devices import (CLASSES, NOISE_P95, SimResources, SimState, cost_table, make_fleet,
                      with_changes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the scenario starts
    set: dict  # SimState fields to change
    tags: dict = field(default_factory=dict)  # tags to add (announced in a new birth)
    classes: tuple[str, ...] = ()  # select by device class (empty: all) ...
    devices: tuple[str, ...] = ()  # ... or by device ID
    fraction: float = 1.0  # ... then a seeded random share of those
    cut_s: float = 0.0  # a partition: the chosen devices lose their link for this long


@dataclass(frozen=True)
class Scenario:
    duration_s: float
    events: tuple[Event, ...] = ()
    # device class → the anchors its devices start with, serving the first (a class left out:
    # none); None: all, serving none
    provision: Mapping[str, tuple[str, ...]] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        """Validate a parsed scenario file; errors name the event and the field."""
        bad = set(d) - {"duration_s", "events", "provision"}
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)}; allowed: duration_s, events, "
                             "provision")
        provision = d.get("provision")
        if provision is not None:
            if not isinstance(provision, dict) or not all(
                    isinstance(v, list) for v in provision.values()):
                raise ValueError("provision must map device classes to lists of anchor names, "
                                 "e.g. {mcu: [mnv3-050]}")
            unknown = set(provision) - set(CLASSES)
            if unknown:
                raise ValueError(f"provision: unknown device classes {sorted(unknown)}; known: "
                                 f"{sorted(CLASSES)}")
            provision = {str(c): tuple(map(str, names)) for c, names in provision.items()}
        allowed = {"at", "set", "tags", "classes", "devices", "fraction", "cut_s"}
        events = []
        for k, e in enumerate(d.get("events") or []):
            bad = set(e) - allowed
            if bad:
                raise ValueError(f"events[{k}]: unknown key(s) {sorted(bad)}; allowed: "
                                 f"{sorted(allowed)}")
            with_changes(SimState(), e.get("set", {}))  # names the unknown field, if any
            tags = e.get("tags") or {}
            if not isinstance(tags, dict):
                raise ValueError(f"events[{k}]: tags must be a mapping, e.g. {{site: north}}")
            events.append(Event(at=float(e["at"]), set=dict(e.get("set", {})),
                                tags={str(t): str(v) for t, v in tags.items()},
                                classes=tuple(e.get("classes", ())),
                                devices=tuple(e.get("devices", ())),
                                fraction=float(e.get("fraction", 1.0)),
                                cut_s=float(e.get("cut_s", 0.0))))
        return cls(float(d["duration_s"]), tuple(sorted(events, key=lambda e: e.at)), provision)


@dataclass
class Served:
    """Device-seconds of one way of choosing models, judged by the simulator's truth."""

    device_s: float = 0.0
    accuracy_s: float = 0.0  # Σ test accuracy × seconds while a model serves within budget
    violation_s: float = 0.0  # a model serves, but its true p95 is over the budget
    no_model_s: float = 0.0
    hybrid_s: float = 0.0  # a hybrid serves (within budget or not)

    def add(self, dt: float, entry: Entry | None, within: bool) -> None:
        self.device_s += dt
        if entry is None:
            self.no_model_s += dt
            return
        self.hybrid_s += dt * (entry.kind == "hybrid")
        if within:
            self.accuracy_s += dt * entry.test_acc
        else:
            self.violation_s += dt

    def figures(self) -> dict:
        """Served accuracy (0–1, over device-seconds; out-of-budget and model-less seconds
        serve nothing), the seconds over budget and without a model, the hybrids' share."""
        n = self.device_s or float("nan")
        return {"served_accuracy": self.accuracy_s / n, "budget_violation_s": self.violation_s,
                "no_model_s": self.no_model_s, "hybrid_share": self.hybrid_s / n}


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
    # device class → the anchors whose segments its devices start with, the first serving from
    # the start (a class left out: none, and no model); None: every anchor, no model
    provision: Mapping[str, Sequence[str]] | None = None
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: int = 0
    trust: tuple = ()  # the controller's public keys, as each agent is provisioned with them
    topics: Topics = field(default_factory=Topics)
    host: ClientHost = field(default_factory=ClientHost)
    devices: list[SimDevice] = field(default_factory=list)
    # accounting: each device's p95 budget (None: unbounded) and other ways of choosing its
    # model each tick (catalog ID or None), judged like the agents' own choice in `served`
    budget: Callable[[SimDevice], float | None] = lambda d: None
    choosers: dict[str, Callable[[SimDevice], str | None]] = field(default_factory=dict)
    served: dict[str, Served] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def __post_init__(self) -> None:
        self.registry = SegmentRegistry()
        self.rng = random.Random(self.seed)
        master = SegmentCache(self.workdir / "master")
        catalog = Catalog.load(self.catalog_dir)
        self.held = self._provisioned(catalog, master)  # class → segment IDs it starts with
        boots = self._boots(catalog, master)  # class → its boot record, in the master cache
        self.costs = cost_table(catalog)  # what each model truly costs: per segment, by kind
        self.entries = {e.id: e for e in catalog.entries}
        for dev_id, res in make_fleet(self.n, self.mix, self.seed):
            res.costs = self.costs
            cache_dir = self.workdir / "devices" / dev_id
            cache = SegmentCache(cache_dir)
            for seg_id in self.held.get(res.cls.name, ()):  # hard links: one copy on disk
                if not cache.has(seg_id):
                    os.link(master.path(seg_id), cache.path(seg_id))
            (cache_dir / BOOT_FILE).unlink(missing_ok=True)  # the agent only reads it
            if res.cls.name in boots:
                os.link(boots[res.cls.name], cache_dir / BOOT_FILE)
            cfg = AgentConfig(dev_id, cache_dir, self.topics, self.telemetry_period,
                              probe=self.probe, trust=self.trust)
            # inline: the real agent's work runs in this one thread's loop, as its callbacks do
            agent = Agent(cfg, res, self.host, self.registry, worker=InlineWorker())
            self.devices.append(SimDevice(dev_id, res, agent))

    def _provisioned(self, catalog: Catalog, master: SegmentCache) -> dict[str, set[str]]:
        """Put the segments of every anchor `provision` names into `master`; returns the
        segment IDs each device class starts with."""
        names = {e.name for e in catalog.anchors}
        by_class = ({c: sorted(names) for c in CLASSES} if self.provision is None
                    else {c: list(a) for c, a in self.provision.items()})
        wanted = sorted({a for anchors in by_class.values() for a in anchors})
        unknown = set(wanted) - names
        if unknown:
            raise ValueError(f"provision: {sorted(unknown)} are not anchors of the catalog "
                             f"{self.catalog_dir}; its anchors: {sorted(names)}")
        if wanted:  # provision() takes no names as every anchor
            provision(master, catalog, wanted)
        return {c: {s for a in anchors for s in catalog.get(a).segments}
                for c, anchors in by_class.items()}

    def _boots(self, catalog: Catalog, master: SegmentCache) -> dict[str, Path]:
        """Write the boot record of every class `provision` names anchors for (its first)
        under `master`; returns class → the record's path."""
        return {c: write_boot(master.root / "boot" / c, boot_model(master, catalog, anchors[0]))
                for c, anchors in (self.provision or {}).items() if anchors}

    def fetched(self) -> int:
        """Segments the devices hold now that they did not start with (fetched as chunks)."""
        return sum(len(set(d.agent.cache.ids()) - self.held.get(d.res.cls.name, set()))
                   for d in self.devices)

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
            if e.tags:
                d.agent.set_tags(d.agent.cfg.tags | e.tags)
        if e.cut_s:
            self.cut(chosen, e.cut_s)
        log.info("scenario @%.0fs: %s%s%s on %d devices", e.at, e.set,
                 f", tags {e.tags}" if e.tags else "",
                 f", cut off for {e.cut_s:.0f} s" if e.cut_s else "", len(chosen))
        return [d.id for d in chosen]

    def true_p95(self, d: SimDevice, entry_id: str) -> float:
        """The true p95 latency of a catalog model on `d` right now."""
        return d.res.true_ms(self.costs[entry_id]) * NOISE_P95

    def account(self, dt: float) -> None:
        """Add `dt` device-seconds per device to `served`, as things stand now: the agents'
        own choice under "restnet", each chooser's under its name."""
        ways = {"restnet": lambda d: (cur.hybrid if (cur := d.agent.slot.get()) else None),
                **self.choosers}
        for d in self.devices:
            budget = self.budget(d)
            for way, choose in ways.items():
                entry = self.entries.get(choose(d) or "")
                within = entry is not None and (budget is None
                                                or self.true_p95(d, entry.id) <= budget)
                self.served.setdefault(way, Served()).add(dt, entry, within)

    def run(self, scenario: Scenario, on_tick=None, tick_s: float = 1.0) -> None:
        """Run the scenario in real time, accounting what is served every `tick_s`;
        `on_tick(elapsed)` is called then too."""
        t0 = time.monotonic()
        pending = list(scenario.events)
        next_tick = last = 0.0
        while (elapsed := time.monotonic() - t0) < scenario.duration_s:
            while pending and pending[0].at <= elapsed:
                self.apply(pending.pop(0))
            if elapsed >= next_tick:
                self.account(elapsed - last)
                last = elapsed
                if on_tick is not None:
                    on_tick(elapsed)
                next_tick += tick_s
            self.host.run_once(0.05)
        self.account(scenario.duration_s - last)

    def stop(self) -> None:
        for d in self.devices:
            d.agent.stop()
        self.host.run(timeout=0.5)
