"""The controller's imperative shell: MQTT in and out, the scheduler, the store.

Decisions are made by the pure planner (`planner.plan`); this module only feeds it twins built
from births and telemetry, publishes retained desired states, follows acks, serves segment
chunks and records everything in SQLite. All fleet state is touched in the MQTT host's thread;
scheduler jobs hand their results to that thread with `host.submit`.

Telemetry is a state report, so it is conflated: the MQTT callback only files each device's
newest report (a newer one replaces an unapplied older one, keeping its place in line), and
the loop applies at most `TELEMETRY_BATCH` of them per pass, between its socket reads. Idle,
every report is applied in the pass that read it; under a flood, reading the broker keeps
pace and each device's newest state is applied a little later. Births, acks and artifact
requests are handled as they come.
"""
from __future__ import annotations

import gc
import logging
import math
import time
from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import replace
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from apscheduler.schedulers.background import BackgroundScheduler

from fleet_protocol.messages import (MAX_GENERATION, MAX_MESSAGE_BYTES, Ack, ArtifactRequest,
                                     ControllerState, Desired, ProtocolError, Rebirth, State,
                                     Telemetry, decode, encode)
from fleet_runtime.mqtt import ClientHost, make_client
from fleet_protocol.signing import KeyDir, keyset, seal, unverified
from fleet_protocol.topics import Topics, check_id
from stitch_lib.catalog import Catalog, Entry

from .artifacts import Artifacts, unknown_artifact
from .costerror import CostErrors
from .finetune import Finetuner
from .planner import Candidate, Twin, learn_speed, plan, plan_inputs, predict_p95, silent
from .policy import FleetPolicy, PolicyError, effective_rule, load_policy
from .prom import ControllerMetrics
from .ratelog import SampledLog
from .rollout import KPI, SENT, Served, WaveState, judge, kpi_breach, next_wave
from .serving import ArtifactServer, ServeLimits
from .store import OPEN, Deployment, Store

log = logging.getLogger(__name__)
DEPLOY_TIMEOUT_S = 60.0  # an open deployment of an online device older than this is abandoned
AVOID_S = 300.0  # a hybrid that failed on a device is not retried there for this long
PROBE_SLACK = 0.15  # the probe-accuracy floor sent to devices: a few probes are noisy
RETENTION_S = 7 * 86400.0  # events and closed deployments older than this are pruned
PRUNE_EVERY_S = 60.0
MAX_REACTIONS = 100_000  # reaction times kept (the newest half stays when it is reached)
TELEMETRY_BATCH = 32  # devices' filed telemetry applied per loop pass (see the module doc)
RECONCILE_SLICE = 100  # devices per loop pass in the periodic sweep (`_reconcile_all`)
MAX_TOPICS = 65_536  # topics parsed and checked, remembered (then forgotten all at once)


@dataclass
class Metrics:
    reactions_ms: list[float] = field(default_factory=list)  # trigger telemetry → HEALTHY
    desired_bytes: int = 0
    chunk_bytes: int = 0
    whole_model_bytes: int = 0  # what shipping each deployed model whole would have cost
    adaptations: int = 0
    failures: int = 0
    cost_errors: CostErrors = field(default_factory=CostErrors)  # predicted against measured p95


class Controller:
    """One controller process. `start()` connects it through `host` and starts its jobs."""

    def __init__(self, policy_path: Path, state_dir: Path, host: ClientHost, keys: Path,
                 topics: Topics = Topics(), clock=time.time, username: str | None = None,
                 password: str | None = None, tls_ca: Path | None = None,
                 retention_s: float = RETENTION_S,
                 serve_limits: ServeLimits = ServeLimits()) -> None:
        self.policy_path, self.host, self.t, self.clock = Path(policy_path), host, topics, clock
        self.retention_s = retention_s
        self.keydir = KeyDir(keys)
        self.signing, self.retiring = self.keydir.load()  # every desired state is signed
        self.keys_seq = self.keydir.seq()
        self._keys_stamp = self.keydir.stamp()
        self.policy = load_policy(self.policy_path)
        self._policy_mtime = self.policy_path.stat().st_mtime
        self.catalog = Catalog.load(self.policy.catalog)
        self.artifacts = Artifacts(self.catalog)
        self.serving = ArtifactServer(self.artifacts, self._publish_chunk, serve_limits)
        self.finetuner = Finetuner(self.catalog)
        self.store = Store(Path(state_dir) / "controller.sqlite")
        self.session = time.time_ns()
        self.stats: Counter[str] = Counter()
        self.metrics = Metrics()
        self.prom = ControllerMetrics(self._tallies)
        self.twins: dict[str, Twin] = {}
        self.sessions: dict[str, int] = {}
        self.device_generation: dict[str, int] = {}  # as devices report it: seeds generations
        self.avoid: dict[str, dict[str, float]] = defaultdict(dict)  # device → hybrid → until
        self.triggers: dict[str, float] = {}  # deployment → time of the telemetry that caused it
        self.running_artifact = self.store.running_artifacts()  # device → artifact it runs
        self.finetune_queue: set[str] = set()
        self.finetune_started: set[str] = set()  # entries queued or tuned: each once
        self.badlog = SampledLog(log)  # bad input: counted always, logged sampled
        self.needs: dict[str, frozenset[str]] = {}  # device → segments its desired state needs
        # device → its newest telemetry not yet applied (payload, time received), in line
        self.inbox: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._topics: dict[str, tuple[str, str]] = {}  # topic → (kind, device), checked
        self._sweep: deque[str] = deque()  # devices the running reconcile sweep has left
        for device, payload in self.store.desired().items():
            d = unverified(Desired, payload)[1]
            self.needs[device] = frozenset(d.front + d.back)
        self.stopped = False
        # a policy change rolls out in waves: devices not yet released keep the old policy
        self.old_policy: FleetPolicy | None = None
        self.rollout: WaveState | None = None
        self.rollout_note = ""
        self._rollout_t0, self._wave_at, self.released = 0.0, None, set()
        # released devices' served figures since their rollout deployment turned HEALTHY:
        # device → (generation, figures); and the devices sent back to their last good model
        self.watch: dict[str, tuple[int, Served]] = {}
        self.returned: dict[str, str] = {}  # device → why
        self._refresh_candidates()
        self._restore_rollout()
        # the one open deployment per device, mirrored in memory (telemetry is the hot path)
        self.open: dict[str, Deployment] = {d.device_id: d for d in
                                            self.store.deployments(open_only=True)}
        # each device's newest closed deployment: a ROLLED_BACK ack may follow its HEALTHY one
        self.closed: dict[str, Deployment] = {}
        for d in self.store.deployments():  # failures stay avoided across a restart
            if d.status in ("FAILED", "ROLLED_BACK") and d.updated + AVOID_S > self.clock():
                self.avoid[d.device_id][d.hybrid] = d.updated + AVOID_S
            if not d.open:
                self.closed[d.device_id] = d  # in creation order: the newest stays
        self._rules: dict[str, tuple] = {}  # device → (what its rule depends on, the rule)
        self._planned: dict[str, tuple] = {}  # device → plan inputs last planned on
        for device_id, doc in self.store.twins().items():
            doc["cached"] = frozenset(doc.get("cached", ()))
            self.twins[device_id] = Twin(**doc)
        self.client: mqtt.Client | None = None
        self._chunk_mids: dict[int, int] = {}  # chunks published, not yet acked: mid → bytes
        self.login = {"username": username, "password": password, "tls_ca": tls_ca}
        self.scheduler = BackgroundScheduler(job_defaults={
            "misfire_grace_time": None, "coalesce": True, "max_instances": 1})

    def _refresh_candidates(self) -> None:
        self.entries = {e.id: e for e in self.catalog.entries}
        self.candidates = [Candidate.from_entry(e) for e in self.catalog.entries]

    # --- lifecycle ----------------------------------------------------------------------
    def start(self, broker_host: str, port: int) -> None:
        will = ControllerState(online=False, session=self.session, ts=self.clock())
        self.client = make_client(f"controller-{self.session}", will=(self.t.ctl_state, encode(will)),
                                  **self.login)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *_: self.serving.reset_window()
        self.host.add(self.client, broker_host, port)
        self.scheduler.add_job(lambda: self.host.submit(self._reconcile_all), "interval",
                               seconds=self.policy.reconcile_interval_s, id="reconcile",
                               replace_existing=True)
        self.scheduler.add_job(self._reload_policy, "interval", seconds=2, id="policy-reload",
                               replace_existing=True)
        self.scheduler.add_job(self._reload_keys, "interval", seconds=2, id="keys-reload",
                               replace_existing=True)
        self.scheduler.add_job(self._finetune_next, "interval", seconds=1, id="finetune",
                               replace_existing=True)
        self.scheduler.add_job(lambda: self.host.submit(self._advance_rollout), "interval",
                               seconds=1, id="rollout", replace_existing=True)
        self.scheduler.add_job(lambda: self.host.submit(self._prune), "interval",
                               seconds=PRUNE_EVERY_S, id="prune", replace_existing=True)
        self.scheduler.start()
        self.serving.start()
        # what was loaded to start (catalog, torch, the store's rows) lives as long as the
        # process: out of the collector's reach, a full collection no longer walks it (it
        # paused the loop for up to 180 ms at 1,000 devices, the bench's reaction p99)
        gc.freeze()

    def stop(self) -> None:
        gc.unfreeze()  # what `start` froze may be garbage now
        self.stopped = True  # calls the scheduler already handed to the host do nothing
        self.inbox.clear()
        self.scheduler.shutdown(wait=False)
        self.serving.stop()
        if self.client is not None:
            self.client.on_message = None  # nothing more is handled once the store closes
            self.client.publish(self.t.ctl_state, encode(ControllerState(
                online=False, session=self.session, ts=self.clock())), qos=1, retain=True)
            self.host.remove(self.client)
        self.store.close()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("controller: connect refused: %s", reason_code)
            return
        self.serving.reset_window()
        self._chunk_mids.clear()
        client.subscribe([(self.t.all_state, 1), (self.t.all_telemetry, 0),
                          (self.t.all_ack, 1), (self.t.all_art_req, 1)])
        client.publish(self.t.ctl_state, encode(ControllerState(
            online=True, session=self.session, ts=self.clock())), qos=1, retain=True)
        self._publish_keys()
        # re-assert every device's desired state: a broker that crashed (or was replaced) may
        # hold an older retained one, or none; devices ignore a generation they already have
        for device, payload in self.store.desired().items():
            client.publish(self.t.desired(device), payload, qos=1, retain=True)
        client.publish(self.t.rebirth, encode(Rebirth(ts=self.clock())), qos=1)

    def _on_message(self, client, userdata, msg) -> None:
        """Every message in: bad input (ProtocolError) is counted and logged sampled, per
        device; anything else that goes wrong is an internal error, logged with its traceback.
        Telemetry is filed for `_apply_telemetry` (see the module doc)."""
        topic, now = msg.topic, self.clock()  # paho decodes the topic at every access
        parsed = self._topics.get(topic) or self.t.parse(topic)
        try:
            if parsed is None:
                raise ProtocolError(f"unexpected topic {topic}")
            kind, device = parsed
            if topic not in self._topics:
                try:
                    check_id(device)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from None
                if len(self._topics) >= MAX_TOPICS:
                    self._topics.clear()
                self._topics[topic] = parsed
            if kind == "telemetry":
                self._file_telemetry(device, msg.payload, now)
                return
            if kind == "state":
                if msg.payload:  # an empty retained payload clears the topic
                    self._on_state(device, decode(State, msg.payload), now)
            elif kind == "ack":
                self._on_ack(device, decode(Ack, msg.payload), now)
            elif kind == "art_req":
                self._on_art_req(device, decode(ArtifactRequest, msg.payload), msg.retain)
            self.stats[f"in_{kind}"] += 1
        except ProtocolError as exc:
            self._dropped(parsed[1] if parsed else "", now, topic, exc)
        except Exception:
            self.stats["errors"] += 1
            log.exception("controller: error handling %s", topic)

    def _dropped(self, device: str, now: float, topic: str, exc: ProtocolError) -> None:
        self.stats["dropped"] += 1
        self.badlog.warning(device, now, "controller: dropped message on %s: %s", topic, exc)

    def _file_telemetry(self, device: str, payload: bytes, now: float) -> None:
        """File `device`'s newest report; an unapplied older one is replaced (conflated)."""
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        if device in self.inbox:
            self.stats["telemetry_conflated"] += 1
        first = not self.inbox
        self.inbox[device] = (payload, now)  # a replaced report keeps its place in line
        if first:
            self.host.submit(self._apply_telemetry)

    def _apply_telemetry(self) -> None:
        """Apply up to `TELEMETRY_BATCH` filed reports, oldest first; the rest next pass."""
        if self.stopped:
            return
        for _ in range(min(TELEMETRY_BATCH, len(self.inbox))):
            device, (payload, now) = self.inbox.popitem(last=False)
            try:
                self._on_telemetry(device, decode(Telemetry, payload), now)
                self.stats["in_telemetry"] += 1
            except ProtocolError as exc:
                self._dropped(device, now, self.t.telemetry(device), exc)
            except Exception:
                self.stats["errors"] += 1
                log.exception("controller: error applying %s's telemetry", device)
        if self.inbox:
            self.host.submit(self._apply_telemetry)

    def _tallies(self) -> dict:
        """What the Prometheus collector reads at scrape time (from its own thread)."""
        stats, m = dict(self.stats), self.metrics  # one C-level copy: safe across threads
        return {"deployments": self.store.count_by_status(), "desired_bytes": m.desired_bytes,
                "chunk_bytes": m.chunk_bytes, "adaptations": m.adaptations,
                "dropped": stats.get("dropped", 0),
                "rollouts_aborted": stats.get("rollouts_aborted", 0),
                "art": {k[4:]: n for k, n in stats.items() if k.startswith("art_")}}

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        nbytes = self._chunk_mids.pop(mid, None)
        if nbytes is not None:
            self.serving.acked(nbytes)

    # --- what devices tell us -----------------------------------------------------------
    def _twin(self, device: str) -> Twin:
        twin = self.twins.get(device)
        if twin is None:
            twin = self.twins[device] = Twin(device_id=device)
        return twin

    def _save_twin(self, twin: Twin) -> None:
        doc = asdict(twin)
        doc["cached"] = sorted(twin.cached)
        self.store.put_twin(twin.device_id, doc)

    def _on_state(self, device: str, s: State, now: float) -> None:
        if s.device_id != device:
            raise ProtocolError(f"state for {s.device_id} on {device}'s topic")
        if s.session < self.sessions.get(device, 0):
            self.stats["stale_state"] += 1  # a will overtaking a rebirth: ignore
            return
        self.sessions[device] = s.session
        self.device_generation[device] = max(self.device_generation.get(device, 0), s.generation)
        twin = self._twin(device)
        twin.online = s.online
        if s.online:
            twin.last_seen = now
            if s.capabilities is not None:
                twin.device_class = s.capabilities.device_class
                twin.mem_mb, twin.gflops = s.capabilities.mem_mb, s.capabilities.gflops
                twin.kind_gflops = dict(s.capabilities.kind_gflops)
                twin.tags = dict(s.capabilities.tags)
            twin.cached = frozenset(s.segments)
            twin.keys_seq = s.keys_seq
            if s.hybrid != twin.running:
                twin.running, twin.since = s.hybrid, now
            twin.booted = s.generation == 0 and s.hybrid is not None
            dep = self.open.get(device)
            if dep is not None and s.generation >= dep.generation:  # settled while we were away
                status = "HEALTHY" if s.hybrid == dep.hybrid else "FAILED"
                self._settle(dep, status, now, "settled by device state")
            elif dep is not None:
                # a broker that crashed may have lost the retained desired state: say it again
                # (a device already working on it ignores the same generation)
                for payload in self.store.desired(device).values():
                    self.client.publish(self.t.desired(device), payload, qos=1, retain=True)
                    self.stats["republished"] += 1
            elif ((done := self.closed.get(device)) is not None and done.status == "HEALTHY"
                  and done.generation == s.generation and done.hybrid != s.hybrid):
                # its canary rolled the deployment back while we were away: the ack was lost
                self._rolled_back(done, f"settled by device state: it runs {s.hybrid} again "
                                  "after HEALTHY", now)
        self._save_twin(twin)

    def _on_telemetry(self, device: str, m: Telemetry, now: float) -> None:
        twin = self._twin(device)
        entry = self.entries.get(m.hybrid or "")
        c = Candidate.from_entry(entry) if entry is not None else None
        if c is not None and m.lat_p95_ms:  # scored on what was predicted before this report
            error = self.metrics.cost_errors.observe(device, c.id, predict_p95(twin, c),
                                                     m.lat_p95_ms)
            if error is not None:
                self.prom.cost_error.observe(error)
        twin.online, twin.last_seen = True, now
        if twin.running is None and m.hybrid is not None:  # e.g. a boot model, ahead of a birth
            twin.running, twin.since, twin.booted = m.hybrid, now, m.generation == 0
        was_c = twin.temp_c
        twin.battery, twin.charging, twin.temp_c = m.battery, m.charging, m.temp_c
        twin.mem_free_mb, twin.lat_p50_ms, twin.lat_p95_ms = m.mem_free_mb, m.lat_p50_ms, m.lat_p95_ms
        if c is not None and m.lat_p50_ms:
            twin.speed = learn_speed(twin, c, m.lat_p50_ms)
        if twin.speed is not None and was_c is not None:  # after learning: the p50 is older
            twin.speed = twin.speed.heated(m.temp_c - was_c)  # than the temperature reading
        watched = self.watch.get(device)
        if watched is not None and m.generation == watched[0]:
            self._watch(device, watched[0], replace(
                watched[1], lat_p95_ms=m.lat_p95_ms, requests=watched[1].requests + m.requests,
                errors=watched[1].errors + m.req_errors))
        self._reconcile(device, now, trigger=m.ts)

    def _on_ack(self, device: str, a: Ack, now: float) -> None:
        if a.device_id != device:
            raise ProtocolError(f"ack for {a.device_id} on {device}'s topic")
        dep = self.open.get(device)
        if dep is None or dep.id != a.deployment_id or dep.generation != a.generation:
            done = self.closed.get(device)
            if (a.status == "ROLLED_BACK" and done is not None and done.status == "HEALTHY"
                    and (done.id, done.generation) == (a.deployment_id, a.generation)):
                twin = self._twin(device)  # it runs the model before again (its birth says so)
                twin.running, twin.since = self._rolled_back(done, a.reason or "", now), now
                twin.booted = False  # back from a deployment: dwell before the next one
                self._save_twin(twin)
                return
            # from memory, not the store: a device's stray acks cost nothing but a counter
            newest = max((d.generation for d in (dep, done) if d is not None), default=0)
            known = a.deployment_id == f"{device}.{a.generation}" and a.generation <= newest
            self.stats["late_ack" if known else "unknown_ack"] += 1
            return
        trigger = self.triggers.get(dep.id)
        self._settle(dep, a.status, now, a.reason or "")
        twin = self._twin(device)
        entry = self.entries.get(dep.hybrid)
        if a.lat_p50_ms and entry is not None:  # a health check measured the new model
            twin.speed = learn_speed(twin, Candidate.from_entry(entry), a.lat_p50_ms)
        if a.status == "HEALTHY":
            twin.running, twin.since, twin.booted = dep.hybrid, now, False
            self.metrics.adaptations += 1
            if trigger is not None:
                self.metrics.reactions_ms.append((now - trigger) * 1e3)
                self.prom.reaction_ms.observe((now - trigger) * 1e3)
            if a.probe_acc is not None:
                self.prom.probe_accuracy.observe(a.probe_acc)
            self._save_twin(twin)
            if (self.rollout is not None and device in self.released
                    and device not in self.returned and dep.created >= self._rollout_t0):
                rule = self._rule(self.policy, device, twin)
                self._watch(device, dep.generation, Served(
                    since=now, expected_acc=entry.test_acc if entry else 0.0,
                    budget_ms=(rule.latency_p95_ms if math.isfinite(rule.latency_p95_ms)
                               else None), probe_acc=a.probe_acc))
        elif a.status in ("FAILED", "ROLLED_BACK"):
            self.metrics.failures += a.status == "FAILED"
            self.avoid[device][dep.hybrid] = now + AVOID_S
            self._save_twin(twin)
            self.store.event(now, device, "failed", f"{dep.id}: {a.reason}")

    def _settle(self, dep: Deployment, status: str, now: float, reason: str) -> None:
        """Record a deployment's new status; a final one closes it."""
        dep.status, dep.updated = status, now
        self.store.update_deployment(dep.id, status, now, reason)
        if status == "HEALTHY":
            self.running_artifact[dep.device_id] = dep.artifact
        if not dep.open:
            if self.open.get(dep.device_id) is dep:
                del self.open[dep.device_id]
            self.closed[dep.device_id] = dep
            self.triggers.pop(dep.id, None)

    def _rolled_back(self, dep: Deployment, reason: str, now: float) -> str | None:
        """The device's canary window found `dep`, HEALTHY until now, serving worse than the
        model before it and went back to that one (docs/protocol.md §6.9): record it and
        avoid the hybrid there, as after any failure. Returns the hybrid of the device's last
        HEALTHY deployment before `dep` (what it runs again), if known."""
        device = dep.device_id
        self._settle(dep, "ROLLED_BACK", now, reason)
        self.metrics.failures += 1
        self.avoid[device][dep.hybrid] = now + AVOID_S
        self.watch.pop(device, None)  # what it served is no longer what it serves
        before = [d for d in self.store.deployments(device)
                  if d.generation < dep.generation and d.status == "HEALTHY"]
        if before:
            self.running_artifact[device] = before[-1].artifact
        else:
            self.running_artifact.pop(device, None)
        self.store.event(now, device, "rolled_back", f"{dep.id} after HEALTHY: {reason}")
        log.warning("%s rolled %s back after its HEALTHY ack: %s", device, dep.id, reason)
        return before[-1].hybrid if before else None

    def _rule(self, policy: FleetPolicy, device: str, twin: Twin):
        key = (id(policy), twin.device_class, tuple(sorted(twin.tags.items())))
        cached = self._rules.get(device)
        if cached is None or cached[0] != key:
            cached = self._rules[device] = (key, effective_rule(policy, device, twin.device_class,
                                                                twin.tags))
        return cached[1]

    def _on_art_req(self, device: str, r: ArtifactRequest, retained: bool) -> None:
        """Queue a request for the artifact server: not a retained one (it would be served
        again after every restart), only for a segment the device's desired state needs, and
        within the device's limits (`ServeLimits`)."""
        if retained:
            self.stats["art_retained_ignored"] += 1
            return
        outcome = self.serving.submit(device, r, needed=r.artifact in self.needs.get(device, ()))
        self.stats[f"art_{outcome}"] += 1
        if outcome == "not_needed":
            self.client.publish(self.t.art_data(device), encode(unknown_artifact(
                r.artifact, "not needed by your desired state")), qos=1)

    def _publish_chunk(self, device: str, payload: bytes, nbytes: int) -> None:
        """From the artifact server's thread: publish one chunk in the MQTT thread."""
        def send() -> None:
            if self.client is None or self.stopped:
                return
            info = self.client.publish(self.t.art_data(device), payload, qos=1)
            self.metrics.chunk_bytes += len(payload)
            if nbytes:
                self._chunk_mids[info.mid] = nbytes
        self.host.submit(send)

    # --- deciding and deploying ---------------------------------------------------------
    def _reconcile_all(self) -> None:
        """Sweep every device, `RECONCILE_SLICE` per loop pass so that telemetry and acks
        are heard in between; a sweep still running is not restarted. One device's failure
        is logged and the others go on."""
        if self.stopped or self._sweep:
            return
        self._sweep.extend(self.twins)
        self._sweep_slice()

    def _sweep_slice(self) -> None:
        if self.stopped:
            self._sweep.clear()
            return
        now = self.clock()
        for _ in range(min(RECONCILE_SLICE, len(self._sweep))):
            device = self._sweep.popleft()
            twin = self.twins.get(device)
            if twin is None:
                continue
            if silent(twin, now, self.policy.telemetry_timeout_s):  # offline: no deployments
                twin.online = False
                self.store.event(now, device, "offline", f"silent for {now - twin.last_seen:.0f} s "
                                 f"> telemetry_timeout_s {self.policy.telemetry_timeout_s:g}")
                self._save_twin(twin)
            self._reconcile_guarded(device, now)
        if self._sweep:
            self.host.submit(self._sweep_slice)

    def _reconcile_guarded(self, device: str, now: float) -> None:
        try:
            self._reconcile(device, now)
        except Exception:
            self.stats["errors"] += 1
            log.exception("controller: reconciling %s failed; the other devices go on", device)

    def _reconcile(self, device: str, now: float, trigger: float | None = None) -> None:
        twin = self._twin(device)
        if not twin.online:
            return
        dep = self.open.get(device)
        if dep is not None:
            if now - dep.updated < DEPLOY_TIMEOUT_S:
                return  # one deployment at a time per device
            self._settle(dep, "TIMEOUT", now, "no progress")
        if trigger is not None:  # telemetry: plan again only if what plan() reads changed
            inputs = plan_inputs(twin)
            if self._planned.get(device) == inputs:
                self.stats["plan_skipped"] += 1
                return
            self._planned[device] = inputs
        policy = self.policy
        if self.rollout is not None and (device not in self.released or device in self.returned):
            policy = self.old_policy  # not in a wave yet, or sent back: the old policy applies
        rule = self._rule(policy, device, twin)
        avoid = {h for h, until in self.avoid.get(device, {}).items() if until > now}
        decision = plan(twin, [c for c in self.candidates if c.id not in avoid], rule, now)
        if decision.target is None:
            running = self.entries.get(twin.running or "")
            if (running is not None and running.kind == "hybrid"
                    and self.running_artifact.get(device, running.artifact) != running.artifact):
                self._deploy(device, running, rule, "stitch fine-tuned: new tensors", None, now,
                             trigger)
            return
        self._deploy(device, self.entries[decision.target], decision.rule or rule, decision.reason,
                     decision.predicted_latency_ms, now, trigger)

    def _deploy(self, device: str, entry: Entry, rule, reason: str,
                predicted: float | None, now: float, trigger: float | None) -> None:
        # newer than anything stored AND than what the device applied (the store may be new)
        generation = max(self.store.last_generation(device),
                         self.device_generation.get(device, 0)) + 1
        if generation > MAX_GENERATION:  # only a device claiming an absurd generation gets here
            self.stats["generation_exhausted"] += 1
            self.badlog.warning(device, now, "controller: %s reports generation %d; no "
                                "deployment can be newer (max %d)", device, generation - 1,
                                MAX_GENERATION)
            return
        front, back = self.artifacts.split(entry)
        budget = rule.latency_p95_ms if math.isfinite(rule.latency_p95_ms) else None
        desired = Desired(
            device_id=device, generation=generation, deployment_id=f"{device}.{generation}",
            hybrid=entry.id, name=entry.name, front=front, back=back,
            stitch=self.artifacts.delta(entry),
            expected_latency_ms=predicted, latency_budget_ms=budget,
            min_accuracy=max(0.0, rule.min_accuracy - PROBE_SLACK) or None, ts=now,
            reason=reason)
        payload = seal(desired, [self.signing])
        dep = Deployment(desired.deployment_id, device, generation, entry.id, "sent", reason,
                         now, now, len(payload), entry.artifact or "")
        self.store.add_deployment(dep)
        self.open[device] = dep
        self.store.put_desired(device, payload)
        self.needs[device] = frozenset(front + back)
        self.client.publish(self.t.desired(device), payload, qos=1, retain=True)
        self.metrics.desired_bytes += len(payload)
        self.metrics.whole_model_bytes += entry.model_bytes
        if trigger is not None:
            self.triggers[desired.deployment_id] = trigger
        if (entry.stitch_state == "ls" and rule.finetune_on_demand
                and entry.id not in self.finetune_started):
            self.finetune_started.add(entry.id)  # once per entry, however often it is deployed
            self.finetune_queue.add(entry.id)
        log.info("deploy %s → %s (gen %d): %s", device, entry.name, generation, reason)

    def _prune(self) -> None:
        """Forget what is past the retention: expired avoidances, old events and closed
        deployments (each device's newest stays), reaction times beyond MAX_REACTIONS."""
        if self.stopped:
            return
        now = self.clock()
        for device in list(self.avoid):
            live = {h: until for h, until in self.avoid[device].items() if until > now}
            if live:
                self.avoid[device] = live
            else:
                del self.avoid[device]
        open_ids = {d.id for d in self.open.values()}
        for dep_id in [k for k in self.triggers if k not in open_ids]:
            del self.triggers[dep_id]  # its deployment closed without a HEALTHY ack
        if len(self.metrics.reactions_ms) > MAX_REACTIONS:
            del self.metrics.reactions_ms[:-MAX_REACTIONS // 2]
        events, deployments = self.store.prune(now - self.retention_s)
        if events or deployments:
            log.info("pruned %d events and %d closed deployments older than %.0f s", events,
                     deployments, self.retention_s)

    def _publish_keys(self) -> None:
        """Announce the trusted keys (retained), signed by each of them: a device that trusts
        only a key being rotated out learns the new one from this."""
        held = [self.signing, *self.retiring]
        ks = keyset(held, seq=self.keys_seq, ts=self.clock())
        self.client.publish(self.t.ctl_keys, seal(ks, held), qos=1, retain=True)
        ids, last = sorted(k.id for k in held), self.store.meta("keys")
        if last is None or last["ids"] != ids:  # devices report keys_seq ≥ since: they have it
            self.store.put_meta("keys", {"ids": ids, "since": ks.seq})

    # --- scheduler jobs (their own threads) ---------------------------------------------
    def _reload_keys(self) -> None:
        """Pick up `restnet keys rotate|retire` without a restart."""
        try:
            stamp = self.keydir.stamp()
            if stamp == self._keys_stamp:
                return
            signing, retiring = self.keydir.load()
            seq = self.keydir.seq()
        except (OSError, ValueError) as exc:
            log.error("keys not reloaded, the old ones stay in force: %s", exc)
            return
        self._keys_stamp = stamp

        def switch() -> None:
            self.signing, self.retiring, self.keys_seq = signing, retiring, seq
            self._publish_keys()
            log.info("signing with key %s; also announcing %s", signing.id,
                     [k.id for k in retiring])
        self.host.submit(switch)

    def _reload_policy(self) -> None:
        try:
            mtime = self.policy_path.stat().st_mtime
            if mtime == self._policy_mtime:
                return
            self._policy_mtime = mtime
            policy = load_policy(self.policy_path)
        except (OSError, PolicyError) as exc:  # load_policy turns any bad content into these
            log.error("policy not reloaded, the old one stays in force: %s", exc)
            return
        self.host.submit(lambda: self._set_policy(policy))

    def _set_policy(self, policy: FleetPolicy) -> None:
        """A new policy reaches the online devices in waves (`rollout` in fleet.yaml)."""
        if self.rollout is None:
            self.old_policy = self.policy
        self.policy = policy
        self._rules.clear()
        now = self.clock()
        online = tuple(sorted(d for d, t in self.twins.items() if t.online))
        self.rollout, self.released = WaveState(online, {}, {}), set()
        self.watch, self.returned = {}, {}
        self.rollout_note = ""
        self._rollout_t0, self._wave_at = now, None
        log.info("policy reloaded from %s; rolling out to %d devices", self.policy_path,
                 len(online))
        self._save_rollout()
        self._advance_rollout()

    def _save_rollout(self) -> None:
        """A rollout in waves survives a controller restart: the policy it replaces, who is
        released, and when."""
        self.store.put_meta("rollout", None if self.rollout is None else {
            "old_policy": self.old_policy.model_dump(mode="json"), "t0": self._rollout_t0,
            "wave_at": self._wave_at, "devices": list(self.rollout.devices),
            "released": sorted(self.released), "returned": self.returned,
            "note": self.rollout_note})

    def _restore_rollout(self) -> None:
        doc = self.store.meta("rollout")
        if doc is None:
            return
        self.old_policy = FleetPolicy.model_validate(doc["old_policy"])
        self.rollout = WaveState(tuple(doc["devices"]), {}, {})
        self._rollout_t0, self._wave_at = doc["t0"], doc["wave_at"]
        self.released, self.rollout_note = set(doc["released"]), doc["note"]
        self.returned = dict(doc.get("returned", {}))
        log.info("resuming the policy rollout: %d of %d devices released", len(self.released),
                 len(self.rollout.devices))

    def _watch(self, device: str, generation: int, served: Served) -> None:
        """Keep a released device's served figures; a breach is acted on at once."""
        self.watch[device] = (generation, served)
        if kpi_breach(served, self.policy.rollout) is not None:
            self._advance_rollout()

    def _advance_rollout(self) -> None:
        """Release the next wave when it is due, or stop on too many failures: a device whose
        served figures breach a KPI goes back to its last good model at once, and on an abort
        every released device does."""
        if self.rollout is None or self.stopped or self.rollout_note.startswith("aborted"):
            return
        now, status = self.clock(), {}
        for d in self.released:
            deps = [x for x in self.store.deployments(d) if x.created >= self._rollout_t0]
            last = deps[-1].status if deps else "HEALTHY"  # nothing to change: done
            status[d] = SENT if last in OPEN else last
        status.update({d: KPI for d in self.returned})  # a return deployment changes nothing
        served = {d: s for d, (_, s) in self.watch.items() if d in self.released}
        self.rollout = judge(WaveState(self.rollout.devices, {}, status, served,
                                       dict(self.returned)), self.policy.rollout)
        breached = {d: why for d, why in self.rollout.reasons.items() if d not in self.returned}
        for d, why in breached.items():
            self.stats["kpi_breaches"] += 1
            log.warning("rollout: %s breaches a KPI: %s", d, why)
            self._return(d, why, now)
        batch, self.rollout_note = next_wave(self.rollout, self.policy.rollout, now,
                                             self._wave_at)
        if batch:
            self._wave_at = now
            self.released |= set(batch)
            self._save_rollout()
            self.store.event(now, None, "rollout", self.rollout_note)
            for d in batch:
                self._reconcile_guarded(d, now)
        elif self.rollout_note == "done":
            self.rollout = self.old_policy = None
            self.watch, self.returned = {}, {}
            self._save_rollout()
        elif self.rollout_note.startswith("aborted"):
            self.stats["rollouts_aborted"] += 1
            for d in sorted(self.released - set(self.returned)):
                self._return(d, "rollout halted", now)
            self._save_rollout()
            self.store.event(now, None, "rollout", self.rollout_note)
            log.error("policy rollout %s; released devices return to their last good model, "
                      "the others keep the old policy", self.rollout_note)
        elif breached:
            self._save_rollout()

    def _return(self, device: str, why: str, now: float) -> None:
        """Send a released device back to what it ran before the rollout (its last HEALTHY
        deployment before it, from the store: the same entry and stitch artifact) under the
        old policy, avoiding the model it was moved to."""
        self.returned[device] = why
        self.watch.pop(device, None)
        deps = self.store.deployments(device)
        moved = [d for d in deps if d.created >= self._rollout_t0]
        for dep in moved:
            self.avoid[device][dep.hybrid] = now + AVOID_S
        before = [d for d in deps if d.created < self._rollout_t0 and d.status == "HEALTHY"]
        entry = self.entries.get(before[-1].hybrid) if before else None
        if not moved:
            return  # the rollout changed nothing on it
        if entry is None:
            self.store.event(now, device, "returned", f"{why}; no earlier model known: the old "
                             "policy decides")
            return
        if before[-1].artifact and before[-1].artifact != entry.artifact and (
                self.catalog.root / "artifacts" / f"{before[-1].artifact}.safetensors").is_file():
            entry = replace(entry, artifact=before[-1].artifact)  # the stitch it ran then
        dep = self.open.get(device)
        if dep is not None:
            self._settle(dep, "CANCELLED", now, f"rollout: {why}")
        self.store.event(now, device, "returned", f"to {entry.name}: {why}")
        log.warning("rollout: %s returns to %s: %s", device, entry.name, why)
        self._deploy(device, entry, self._rule(self.old_policy, device, self._twin(device)),
                     f"back to the last good model: {why}", None, now, None)

    def _finetune_next(self) -> None:
        if not self.finetune_queue:
            return
        entry_id = self.finetune_queue.pop()
        try:
            update = self.finetuner.run(entry_id)
        except Exception:
            log.exception("fine-tuning %s failed", entry_id)
            return
        self.host.submit(lambda: self._finetuned(entry_id, update))

    def _finetuned(self, entry_id: str, update: dict) -> None:
        self.finetuner.apply(entry_id, update)
        self._refresh_candidates()
        self._reconcile_all()  # devices running the old stitch get the new one
