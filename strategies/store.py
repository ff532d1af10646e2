"""The server's durable MKV store: one SQLite file in WAL mode.

Every accepted upload is one row of ``uploads`` (run, client, slot, model fingerprint, count) with
its arrays as blobs (name, dtype, shape) and its items (opaque request id and tag, by position). A
restarted server reopens the file and resumes with nothing lost; a client re-uploading the same
slot replaces its earlier upload for that slot in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
"""
DIGEST_INDEX = "CREATE INDEX IF NOT EXISTS items_by_digest ON items (digest)"


def row_digests(z: np.ndarray) -> list[str]:
    """SHA-256 of each z row as float32 bytes: what a replayed vector is recognised by."""
    rows = np.ascontiguousarray(np.asarray(z, dtype=np.float32))
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in rows]


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
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA synchronous=NORMAL")
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
    ) -> int:
        """Store one upload (replacing the same client's upload for that slot); returns its id."""
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
                array = np.ascontiguousarray(array)
                self.db.execute(
                    "INSERT INTO arrays VALUES (?,?,?,?,?)",
                    (upload_id, name, array.dtype.str, json.dumps(list(array.shape)), array.tobytes()),
                )
            digests = row_digests(arrays["z"]) if "z" in arrays else [None] * len(ids)
            self.db.executemany(
                "INSERT INTO items (upload_id, position, request_id, tag, digest) VALUES (?,?,?,?,?)",
                [(upload_id, i, rid, tag, d) for i, (rid, tag, d) in enumerate(zip(ids, tags, digests))],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return upload_id

    def _load(self, row) -> Upload:
        upload_id, run_id, client, slot, fingerprint = row
        arrays = {
            name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape)).copy()
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
        self, run_id: str, slot: int | None = None, exclude_client: str | None = None, after_slot: int | None = None
    ) -> list[Upload]:
        """Uploads of a run, optionally of one slot, after a slot, and not from one client."""
        query = "SELECT id, run_id, client, slot, fingerprint FROM uploads WHERE run_id=?"
        params: list = [run_id]
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

    def find_tags(self, run_id: str, tags: list[str]) -> dict[str, tuple[int, int]]:
        """For each known tag: (upload id, position) of its first stored occurrence in the run."""
        found: dict[str, tuple[int, int]] = {}
        for tag in set(tags):
            row = self.db.execute(
                "SELECT items.upload_id, items.position FROM items JOIN uploads ON uploads.id = items.upload_id "
                "WHERE uploads.run_id=? AND items.tag=? ORDER BY uploads.slot, items.upload_id LIMIT 1",
                (run_id, tag),
            ).fetchone()
            if row:
                found[tag] = (row[0], row[1])
        return found

    def replayed(self, run_id: str, client: str, slot: int, digests: list[str]) -> list[int]:
        """Positions of ``digests`` already stored in the run by another client or another slot."""
        seen = set()
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            rows = self.db.execute(
                "SELECT items.digest FROM items JOIN uploads ON uploads.id = items.upload_id "
                f"WHERE uploads.run_id=? AND NOT (uploads.client=? AND uploads.slot=?) "
                f"AND items.digest IN ({','.join('?' * len(chunk))})",
                (run_id, client, slot, *chunk),
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

    def count(self, run_id: str) -> int:
        """Number of stored MKVs (requests) in a run."""
        return int(self.db.execute("SELECT COALESCE(SUM(n), 0) FROM uploads WHERE run_id=?", (run_id,)).fetchone()[0])

    def last_slot(self, run_id: str) -> int | None:
        row = self.db.execute("SELECT MAX(slot) FROM uploads WHERE run_id=?", (run_id,)).fetchone()
        return row[0]
