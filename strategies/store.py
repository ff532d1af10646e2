"""The server's durable MKV store: one SQLite file in WAL mode with ``synchronous=FULL`` (a
committed upload survives a power cut), checked with ``PRAGMA quick_check`` when it is opened.

Every accepted upload is one row of ``uploads`` (run, client, slot, model fingerprint, count) with
its arrays as blobs (name, dtype, shape) and its items (opaque request id, tag and the digest a
replay is recognised by: of the z row, or of the whole sealed set, by position). A restarted server reopens the file and resumes with nothing lost; a client re-uploading
the same slot replaces its earlier upload for that slot in one transaction. Every query is keyed by
run *and* model fingerprint, so a reused run name never serves another model's MKVs.

The same file keeps the server's own position in the run (``SlotProgress``: the slot and phase
reached, the clients already served, the strategy's intermediate arrays such as EditAvg's average
or CollabEdit's summed statistics), replaced whole in one transaction each time it moves, so a
server killed at any point resumes inside the slot where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    client TEXT NOT NULL,
    slot INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    n INTEGER NOT NULL,
    created REAL NOT NULL,
    UNIQUE (run_id, client, slot)
);
CREATE TABLE IF NOT EXISTS arrays (
    upload_id INTEGER NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (upload_id, name)
);
CREATE TABLE IF NOT EXISTS items (
    upload_id INTEGER NOT NULL REFERENCES uploads(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    tag TEXT,
    digest TEXT,
    PRIMARY KEY (upload_id, position)
);
CREATE INDEX IF NOT EXISTS items_by_tag ON items (tag);
CREATE TABLE IF NOT EXISTS progress (
    run_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    strategy TEXT NOT NULL,
    slot INTEGER NOT NULL,
    phase TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, fingerprint)
);
CREATE TABLE IF NOT EXISTS progress_arrays (
    run_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, fingerprint, name)
);
"""
DIGEST_INDEX = "CREATE INDEX IF NOT EXISTS items_by_digest ON items (digest)"


def blob_digest(blob: bytes) -> str:
    """SHA-256 of a sealed set: a replayed ciphertext is recognised by it."""
    return hashlib.sha256(blob).hexdigest()


def row_digests(z: np.ndarray) -> list[str]:
    """SHA-256 of each z row as float32 bytes: what a replayed vector is recognised by."""
    rows = np.ascontiguousarray(np.asarray(z, dtype=np.float32))
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]


class StoreError(RuntimeError):
    """The store cannot be opened or written (damaged file, full disk)."""


@dataclass
class SlotProgress:
    """Where the server is in a run: ``phase`` of ``slot`` reached (``"start"`` of slot s = slots
    before s are done), the clients that finished that phase (``served``), small JSON ``state``
    (e.g. the clients that left the run) and the phase's arrays."""

    strategy: str
    slot: int
    phase: str = "start"
    served: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def _blob(array: np.ndarray) -> tuple[str, str, bytes]:
    array = np.ascontiguousarray(array)
    return array.dtype.str, json.dumps(list(array.shape)), array.tobytes()


def _array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape)).copy()


@dataclass
class Upload:
    id: int
    run_id: str
    client: str
    slot: int
    fingerprint: str
    ids: list[str]
    tags: list[str | None]
    arrays: dict[str, np.ndarray]


class MKVStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            check = self.db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as err:
            check = (str(err),)
        if check is None or check[0] != "ok":
            self.db.close()
            raise StoreError(
                f"the MKV store {self.path} is damaged ({check[0] if check else 'no answer'}): move it away "
                "and start the run under a new run-name, or restore it from a backup"
            )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        if "digest" not in [row[1] for row in self.db.execute("PRAGMA table_info(items)")]:
            self.db.execute("ALTER TABLE items ADD COLUMN digest TEXT")  # a store from before replay checks
        self.db.execute(DIGEST_INDEX)

    def close(self) -> None:
        self.db.close()

    def put(
        self,
        run_id: str,
        client: str,
        slot: int,
        fingerprint: str,
        ids: list[str],
        tags: list[str | None],
        arrays: dict[str, np.ndarray],
        progress: SlotProgress | None = None,
        digests: list[str] | None = None,
    ) -> int:
        """Store one upload (replacing the same client's upload for that slot); returns its id.
        ``progress``: the run's new progress, recorded in the same transaction; ``digests``: what a
        replay of each item is recognised by (default: ``row_digests`` of z, when there is one)."""
        if len(tags) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(tags)} tags")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM uploads WHERE run_id=? AND client=? AND slot=?", (run_id, client, slot))
            cur = self.db.execute(
                "INSERT INTO uploads (run_id, client, slot, fingerprint, n, created) VALUES (?,?,?,?,?,?)",
                (run_id, client, slot, fingerprint, len(ids), time.time()),
            )
            upload_id = cur.lastrowid
            for name, array in arrays.items():
                self.db.execute("INSERT INTO arrays VALUES (?,?,?,?,?)", (upload_id, name, *_blob(array)))
            if digests is None:
                digests = row_digests(arrays["z"]) if "z" in arrays else [None] * len(ids)
            self.db.executemany(
                "INSERT INTO items (upload_id, position, request_id, tag, digest) VALUES (?,?,?,?,?)",
                [(upload_id, i, rid, tag, d) for i, (rid, tag, d) in enumerate(zip(ids, tags, digests))],
            )
            if progress is not None:
                self._write_progress(run_id, fingerprint, progress)
            self.db.execute("COMMIT")
        except BaseException as err:
            self._abort(err, "take the upload")
        return upload_id

    def _abort(self, err: BaseException, what: str) -> NoReturn:
        """Roll back the open transaction and re-raise (a SQLite error as ``StoreError``)."""
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:  # SQLite may have rolled back already (disk full): the first error counts
            pass
        if isinstance(err, sqlite3.Error):
            raise StoreError(f"the MKV store {self.path} cannot {what}: {err}") from err
        raise err

    # --- the server's own position in a run -----------------------------------------------------
    def save_progress(self, run_id: str, fingerprint: str, progress: SlotProgress) -> None:
        """Replace the run's progress (one transaction: a crash leaves the old one or the new one)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._write_progress(run_id, fingerprint, progress)
            self.db.execute("COMMIT")
        except BaseException as err:
            self._abort(err, "record the run's progress")

    def _write_progress(self, run_id: str, fingerprint: str, progress: SlotProgress) -> None:
        key = (run_id, fingerprint)
        self.db.execute("DELETE FROM progress WHERE run_id=? AND fingerprint=?", key)
        self.db.execute("DELETE FROM progress_arrays WHERE run_id=? AND fingerprint=?", key)
        state = json.dumps({"served": progress.served, **progress.state})
        self.db.execute(
            "INSERT INTO progress VALUES (?,?,?,?,?,?)", (*key, progress.strategy, progress.slot, progress.phase, state)
        )
        for name, array in progress.arrays.items():
            self.db.execute("INSERT INTO progress_arrays VALUES (?,?,?,?,?,?)", (*key, name, *_blob(array)))

    def progress(self, run_id: str, fingerprint: str) -> SlotProgress | None:
        """The run's last recorded progress, or None for a run this store has not seen."""
        key = (run_id, fingerprint)
        row = self.db.execute(
            "SELECT strategy, slot, phase, state FROM progress WHERE run_id=? AND fingerprint=?", key
        ).fetchone()
        if row is None:
            return None
        state = json.loads(row[3])
        arrays = {
            name: _array(dtype, shape, data)
            for name, dtype, shape, data in self.db.execute(
                "SELECT name, dtype, shape, data FROM progress_arrays WHERE run_id=? AND fingerprint=?", key
            )
        }
        return SlotProgress(row[0], row[1], row[2], state.pop("served"), state, arrays)

    def _load(self, row) -> Upload:
        upload_id, run_id, client, slot, fingerprint = row
        arrays = {
            name: _array(dtype, shape, data)
            for name, dtype, shape, data in self.db.execute(
                "SELECT name, dtype, shape, data FROM arrays WHERE upload_id=?", (upload_id,)
            )
        }
        items = self.db.execute(
            "SELECT request_id, tag FROM items WHERE upload_id=? ORDER BY position", (upload_id,)
        ).fetchall()
        return Upload(
            upload_id, run_id, client, slot, fingerprint, [i for i, _ in items], [t for _, t in items], arrays
        )

    def uploads(
        self,
        run_id: str,
        slot: int | None = None,
        exclude_client: str | None = None,
        after_slot: int | None = None,
        fingerprint: str | None = None,
    ) -> list[Upload]:
        """Uploads of a run (of one model), optionally of one slot, after a slot, and not from one client."""
        query = "SELECT id, run_id, client, slot, fingerprint FROM uploads WHERE run_id=?"
        params: list = [run_id]
        if fingerprint is not None:
            query += " AND fingerprint=?"
            params.append(fingerprint)
        if slot is not None:
            query += " AND slot=?"
            params.append(slot)
        if after_slot is not None:
            query += " AND slot>?"
            params.append(after_slot)
        if exclude_client is not None:
            query += " AND client<>?"
            params.append(exclude_client)
        return [self._load(row) for row in self.db.execute(query + " ORDER BY slot, client, id", params).fetchall()]

    def find_tags(
        self, run_id: str, tags: list[str], fingerprint: str | None = None, before_slot: int | None = None
    ) -> dict[str, tuple[int, int]]:
        """For each known tag: (upload id, position) of its first stored occurrence in the run (of one
        model), in a slot before ``before_slot`` when given."""
        found: dict[str, tuple[int, int]] = {}
        for tag in set(tags):
            row = self.db.execute(
                "SELECT items.upload_id, items.position FROM items JOIN uploads ON uploads.id = items.upload_id "
                "WHERE uploads.run_id=? AND items.tag=? AND (? IS NULL OR uploads.fingerprint=?) "
                "AND (? IS NULL OR uploads.slot<?) ORDER BY uploads.slot, items.upload_id LIMIT 1",
                (run_id, tag, fingerprint, fingerprint, before_slot, before_slot),
            ).fetchone()
            if row:
                found[tag] = (row[0], row[1])
        return found

    def replayed(
        self, run_id: str, client: str, slot: int, digests: list[str], fingerprint: str | None = None
    ) -> list[int]:
        """Positions of ``digests`` already stored in the run (of one model) by another client or slot."""
        seen = set()
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            rows = self.db.execute(
                "SELECT items.digest FROM items JOIN uploads ON uploads.id = items.upload_id "
                "WHERE uploads.run_id=? AND (? IS NULL OR uploads.fingerprint=?) "
                "AND NOT (uploads.client=? AND uploads.slot=?) "
                f"AND items.digest IN ({','.join('?' * len(chunk))})",
                (run_id, fingerprint, fingerprint, client, slot, *chunk),
            )
            seen.update(row[0] for row in rows)
        return [i for i, d in enumerate(digests) if d in seen]

    def get(self, upload_id: int) -> Upload:
        row = self.db.execute(
            "SELECT id, run_id, client, slot, fingerprint FROM uploads WHERE id=?", (upload_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no upload {upload_id}")
        return self._load(row)

    def count(self, run_id: str, fingerprint: str | None = None) -> int:
        """Number of stored MKVs (requests) in a run (of one model)."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(n), 0) FROM uploads WHERE run_id=? AND (? IS NULL OR fingerprint=?)",
            (run_id, fingerprint, fingerprint),
        ).fetchone()
        return int(row[0])

    def last_slot(self, run_id: str) -> int | None:
        row = self.db.execute("SELECT MAX(slot) FROM uploads WHERE run_id=?", (run_id,)).fetchone()
        return row[0]
