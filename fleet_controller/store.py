"""The controller's memory across restarts: device twins, deployments and events, in SQLite.

Every write is one transaction, so a controller killed at any moment restarts from a state
where each deployment either exists (with its generation) or does not: no duplicate, no loss.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS twins (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY, device_id TEXT NOT NULL, generation INTEGER NOT NULL,
    hybrid TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, payload_bytes INTEGER NOT NULL,
    artifact TEXT NOT NULL, UNIQUE (device_id, generation));
CREATE INDEX IF NOT EXISTS deployments_open ON deployments (status);
CREATE TABLE IF NOT EXISTS desired (device_id TEXT PRIMARY KEY, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    ts REAL NOT NULL, device_id TEXT, kind TEXT NOT NULL, detail TEXT NOT NULL);
"""
OPEN = ("sent", "RECEIVED", "FETCHING", "VERIFIED", "SWAPPED")


@dataclass
class Deployment:
    id: str
    device_id: str
    generation: int
    hybrid: str
    status: str  # "sent", then the device's ack statuses
    reason: str
    created: float
    updated: float
    payload_bytes: int
    artifact: str = ""  # the catalog artifact deployed (a stitch's changes when it is tuned)

    @property
    def open(self) -> bool:
        return self.status in OPEN


class Store:
    """A small SQLite store, safe to call from the MQTT thread and scheduler threads."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # twins are stored as JSON documents
    def put_twin(self, device_id: str, doc: dict) -> None:
        self._run("INSERT OR REPLACE INTO twins VALUES (?, ?)", (device_id, json.dumps(doc)))

    def twins(self) -> dict[str, dict]:
        return {d: json.loads(doc) for d, doc in self._run("SELECT device_id, doc FROM twins")}

    def put_desired(self, device_id: str, payload: bytes) -> None:
        """Keep the signed desired state last sent to a device (the broker's retained copy
        may be lost or stale after a broker crash; the controller re-asserts this one)."""
        self._run("INSERT OR REPLACE INTO desired VALUES (?, ?)", (device_id, payload))

    def desired(self, device_id: str | None = None) -> dict[str, bytes]:
        """device → the signed desired state last sent to it (one device, or all)."""
        if device_id is None:
            return dict(self._run("SELECT device_id, payload FROM desired"))
        return dict(self._run("SELECT device_id, payload FROM desired WHERE device_id=?",
                              (device_id,)))

    def put_meta(self, key: str, doc: dict | None) -> None:
        """Keep (or, with None, forget) a JSON document of the controller's own state."""
        if doc is None:
            self._run("DELETE FROM meta WHERE key=?", (key,))
        else:
            self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(doc)))

    def meta(self, key: str) -> dict | None:
        rows = self._run("SELECT doc FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def add_deployment(self, dep: Deployment) -> None:
        """Record a new deployment; its (device, generation) must be new."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?)",
                                 tuple(asdict(dep).values()))
                self._db.execute("INSERT INTO events VALUES (?,?,?,?)",
                                 (dep.created, dep.device_id, "deploy",
                                  f"{dep.id} gen {dep.generation} → {dep.hybrid}: {dep.reason}"))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def update_deployment(self, dep_id: str, status: str, now: float, reason: str = "") -> None:
        self._run("UPDATE deployments SET status=?, updated=?, "
                  "reason=CASE WHEN ?='' THEN reason ELSE ? END WHERE id=?",
                  (status, now, reason, reason, dep_id))

    def deployments(self, device_id: str | None = None, open_only: bool = False) -> list[Deployment]:
        sql, args = "SELECT * FROM deployments", []
        conds = []
        if device_id is not None:
            conds.append("device_id=?")
            args.append(device_id)
        if open_only:
            conds.append(f"status IN ({','.join('?' * len(OPEN))})")
            args += OPEN
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        return [Deployment(*row) for row in self._run(sql + " ORDER BY created", tuple(args))]

    def running_artifacts(self) -> dict[str, str]:
        """Per device, the artifact of its last healthy deployment."""
        rows = self._run("SELECT device_id, artifact FROM deployments WHERE status='HEALTHY' "
                         "ORDER BY created")
        return dict(rows)

    def count_by_status(self) -> dict[str, int]:
        """Deployments kept, by status."""
        return dict(self._run("SELECT status, COUNT(*) FROM deployments GROUP BY status"))

    def last_generation(self, device_id: str) -> int:
        row = self._run("SELECT MAX(generation) FROM deployments WHERE device_id=?", (device_id,))
        return row[0][0] or 0

    def prune(self, before: float) -> tuple[int, int]:
        """Delete events older than `before`, and closed deployments last updated before it
        except each device's newest (its generation) and newest healthy one (the artifact it
        runs). Returns (events, deployments) deleted."""
        keep = ("SELECT id FROM deployments d WHERE generation = (SELECT MAX(generation) FROM "
                "deployments e WHERE e.device_id = d.device_id) UNION SELECT id FROM "
                "deployments d WHERE status = 'HEALTHY' AND created = (SELECT MAX(created) "
                "FROM deployments e WHERE e.device_id = d.device_id AND status = 'HEALTHY')")
        with self._lock:
            events = self._db.execute("DELETE FROM events WHERE ts < ?", (before,)).rowcount
            deps = self._db.execute(
                f"DELETE FROM deployments WHERE updated < ? AND status NOT IN "
                f"({','.join('?' * len(OPEN))}) AND id NOT IN ({keep})",
                (before, *OPEN)).rowcount
        return events, deps

    def event(self, ts: float, device_id: str | None, kind: str, detail: str) -> None:
        self._run("INSERT INTO events VALUES (?,?,?,?)", (ts, device_id, kind, detail))

    def events(self, limit: int = 100) -> list[tuple]:
        return self._run("SELECT * FROM events ORDER BY ts DESC LIMIT ?", (limit,))
