"""Nothing lost on failure: a full disk, a damaged store, a truncated checkpoint, a reused run name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fededit_core.client.participant import CheckpointError, Participant
from fededit_core.io import last_good
from strategies.store import MKVStore, StoreError
from tests.test_participant import TEMPLATES, req, shared  # noqa: F401 - the tiny editor fixture
from tests.test_strategies import SPEC, mkv_arrays


def test_a_full_disk_is_a_clear_store_error_and_the_store_keeps_what_it_had(tmp_path):
    store = MKVStore(tmp_path / "mkv.sqlite")
    store.put("run", "c0", 0, SPEC.fingerprint, ["c0/0/0"], [None], mkv_arrays(1))
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages + 2}")  # the disk is full after two more pages
    big = {k: np.repeat(v, 2000, axis=0) if k != "layers" else v for k, v in mkv_arrays(1).items()}
    with pytest.raises(StoreError, match="cannot take the upload: database or disk is full"):
        store.put("run", "c1", 0, SPEC.fingerprint, [f"c1/0/{i}" for i in range(2000)], [None] * 2000, big)
    assert store.count("run") == 1 and [u.client for u in store.uploads("run")] == ["c0"]


def test_a_damaged_store_is_refused_when_opened(tmp_path):
    path = tmp_path / "mkv.sqlite"
    store = MKVStore(path)
    store.put("run", "c0", 0, SPEC.fingerprint, ["c0/0/0"], [None], mkv_arrays(1))
    store.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the header's tail and the first page's b-tree
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="is damaged"):
        MKVStore(path)


def test_a_reused_run_name_never_serves_another_models_mkvs(tmp_path):
    store = MKVStore(tmp_path / "mkv.sqlite")
    store.put("run", "c0", 0, "model-a", ["c0/0/0"], ["t" * 64], mkv_arrays(1))
    store.put("run", "c1", 0, "model-b", ["c1/0/0"], ["t" * 64], mkv_arrays(1, seed=1))
    assert [u.client for u in store.uploads("run", fingerprint="model-b")] == ["c1"]
    ((upload, _),) = store.find_tags("run", ["t" * 64], fingerprint="model-b").values()
    assert store.get(upload).client == "c1"
    assert store.count("run", "model-a") == 1 and store.count("run") == 2


def test_a_truncated_checkpoint_falls_back_to_the_last_good_one(shared, tmp_path):  # noqa: F811
    folder = tmp_path / "ckpt" / "a"
    requests = [req("1", "Anna", "Rome"), req("2", "Boris", "Oslo")]
    a = Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
    a.edit_slot(0)
    after_first = {l: w.clone() for l, w in a.layers.items()}
    a.edit_slot(1)
    assert (last_good(folder) / "state.json").is_file()
    layers = folder / "layers.safetensors"
    layers.write_bytes(layers.read_bytes()[: layers.stat().st_size // 2])  # a crash mid-write, a bad disk
    restarted = Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
    assert restarted.next_slot == 1  # the checkpoint before the last step: the server repeats slot 1
    assert all(torch.equal(restarted.layers[l], after_first[l]) for l in after_first)
    restarted.edit_slot(1)
    assert Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder).next_slot == 2


def test_no_usable_checkpoint_is_a_clear_error(shared, tmp_path):  # noqa: F811
    folder = tmp_path / "ckpt" / "a"
    requests = [req("1", "Anna", "Rome"), req("2", "Boris", "Oslo")]
    a = Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
    a.edit_slot(0)
    a.edit_slot(1)
    for f in (folder / "layers.safetensors", last_good(folder) / "layers.safetensors"):
        f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
