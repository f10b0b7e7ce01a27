"""The closed loop's test harness: a controller and real agents on one ClientHost, against a
real Mosquitto with authentication on and signed deployments."""
import time

import yaml

from device_agent.agent import Agent, AgentConfig
from device_agent.cache import SegmentCache, SegmentRegistry, provision
from fleet_controller.artifacts import Artifacts
from fleet_controller.service import Controller
from fleet_protocol.messages import Ack, Desired, decode
from fleet_runtime.mqtt import ClientHost, make_client, parse_url
from fleet_protocol.signing import KeyDir, load_public, seal
from fleet_protocol.topics import Topics
from simulators.devices import CLASSES, SimResources, SimState

T = Topics()


def write_policy(path, catalog_dir, **defaults):
    doc = {"catalog": str(catalog_dir), "reconcile_interval_s": 1,
           "defaults": {"objective": "max_accuracy",
                        "battery_modes": [{"below": 0.3, "objective": "min_energy"}],
                        "hysteresis": {"min_dwell_s": 0, "min_gain": 0.0},
                        "finetune_on_demand": False, **defaults}}
    path.write_text(yaml.safe_dump(doc))
    return path


class Loop:
    """A controller and agents on one ClientHost, run from the test's thread."""

    def __init__(self, broker, catalog, tmp_path, keys, **policy):
        self.broker, self.catalog, self.tmp, self.keys = broker, catalog, tmp_path, keys
        self.trust = (load_public(keys / "controller.pub"),)
        self.host = ClientHost()
        self.policy = write_policy(tmp_path / "fleet.yaml", catalog.root, **policy)
        self.registry = SegmentRegistry()
        self.agents: dict[str, Agent] = {}
        self.controller = None

    def start_controller(self):
        self.controller = Controller(self.policy, self.tmp / "ctl", self.host, self.keys,
                                     **self.login("controller"))
        self.controller.start(*parse_url(self.broker.url))
        return self.controller

    def add_agent(self, dev_id, cls="rpi4", battery=0.9, provisioned=True, worker=None,
                  boot=None, **cfg):
        """A real agent on the loop's host; its work runs on a thread of its own, as on a
        board, unless `worker` says otherwise (an InlineWorker runs it in the handlers).
        `boot`: the anchor it is provisioned to serve from its start."""
        cache_dir = self.tmp / "dev" / dev_id
        if provisioned:
            provision(SegmentCache(cache_dir), self.catalog, boot=boot)
        res = SimResources(CLASSES[cls], SimState(battery=battery))
        agent = Agent(AgentConfig(dev_id, cache_dir, telemetry_period=0.2, trust=self.trust,
                                  **self.login(dev_id), **cfg), res, self.host, self.registry,
                      worker=worker)
        agent.start(*parse_url(self.broker.url))
        self.agents[dev_id] = agent
        return agent

    def publisher(self, keys, catalog, dev):
        """deploy(k, entry, **extra): publish a signed desired state of generation k for `dev`
        (the controller's key, an operator's login) and wait for its HEALTHY or ROLLED_BACK
        ack; and the acks seen, as (topic, payload)."""
        trusted, _ = KeyDir(keys).load()
        client, acks = self.spy("operator", T.ack(dev))
        arts = Artifacts(catalog)

        def deploy(k, entry, **extra):
            front, back = arts.split(entry)
            d = Desired(device_id=dev, generation=k, deployment_id=f"{dev}.{k}",
                        hybrid=entry.id, name=entry.name, front=front, back=back,
                        stitch=arts.delta(entry), ts=time.time(), **extra)
            client.publish(T.desired(dev), seal(d, [trusted]), qos=1)
            self.run_until(lambda: any(
                a.generation == k and a.status in ("HEALTHY", "ROLLED_BACK")
                for a in (decode(Ack, p) for _, p in acks)))
        return deploy, acks

    def run_until(self, cond, timeout=20.0):
        self.host.run(until=cond, timeout=timeout)
        assert cond(), f"condition not reached in time: {self.describe()}"

    def describe(self) -> str:
        deps = self.controller.store.deployments() if self.controller else []
        return (f"agents {[(a.cfg.device_id, dict(a.stats), self.running(i)) for i, a in self.agents.items()]}"
                f"; deployments {[(d.id, d.hybrid, d.status, d.reason) for d in deps]}")

    def spy(self, name, topic):
        """A client with an operator login `name` (the controller's rights), collecting
        (topic, payload) of what arrives on `topic`; it may also publish what only the
        controller may (desired states)."""
        got = []
        c = make_client(name, **self.operator(name))
        c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        self.host.add(c, *parse_url(self.broker.url))
        self.run_until(lambda: c.is_connected())
        return c, got

    def login(self, user):
        """make_client's username/password for `user` (a device user is added if new)."""
        creds = self.credentials([user])
        return {} if creds is None else {"username": user, "password": creds[user]}

    def operator(self, name):
        """make_client's username/password for an operator login `name` (added if new)."""
        if self.broker.creds is None:
            return {}
        if name not in self.broker.operators:
            self.broker.add_operators([name])
        return {"username": name, "password": self.broker.creds[name]}

    def credentials(self, users):
        """The broker's credentials, with `users` added if new; None if it is anonymous."""
        if self.broker.creds is not None and set(users) - set(self.broker.creds):
            self.broker.add_devices(sorted(set(users) - set(self.broker.creds)))
        return self.broker.creds

    def running(self, dev_id):
        cur = self.agents[dev_id].slot.get()
        return cur.hybrid if cur else None

    def close(self):
        if self.controller:
            self.controller.stop()
        self.host.run(timeout=0.2)
        self.host.close()


def healthy(agent):
    return agent.stats["HEALTHY"]

