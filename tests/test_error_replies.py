"""What a failed step tells the server: this project's own step errors keep their message, any other
error only its kind, since a data error may quote a private record (its prompt, its subject)."""

import json

import pytest

from client_app import app as client_app
from client_app.worker_service import RemoteWorker, WorkerStepFailed, serve
from fededit_core.client.worker import ClientSpec, WorkerError
from fededit_core.data.loaders import load_requests

SECRET_SUBJECT, SECRET_PROMPT = "Patient Zeta Secretname", "The diagnosis of is"


def _private_data_error(tmp_path) -> Exception:
    bad = tmp_path / "private.jsonl"
    bad.write_text(json.dumps({"subject": SECRET_SUBJECT, "prompt": SECRET_PROMPT, "target_new": "flu"}) + "\n")
    with pytest.raises(Exception) as caught:
        load_requests(bad)
    assert SECRET_PROMPT in str(caught.value)  # the loader quotes the record: fine locally, not for the server
    return caught.value


class FailingWorker:
    _editors: dict = {}  # what the health check counts

    def __init__(self, err: Exception):
        self.err = err

    def handle(self, op, spec, args, arrays):
        raise self.err


def test_a_data_error_reaches_the_server_without_the_records_text(tmp_path):
    text = client_app.shareable_error(_private_data_error(tmp_path))
    assert text.startswith("DataError") and SECRET_PROMPT not in text and SECRET_SUBJECT not in text


def test_the_projects_own_step_errors_keep_their_message():
    assert client_app.shareable_error(WorkerError("slot must be an integer in [0, 3), got 7")) == (
        "WorkerError: slot must be an integer in [0, 3), got 7"
    )


def test_through_the_grpc_worker_only_the_kind_of_a_foreign_error_leaves(tmp_path):
    err = _private_data_error(tmp_path)
    socket = f"unix:{tmp_path / 'w.sock'}"
    server = serve(socket, FailingWorker(err))
    try:
        remote = RemoteWorker(socket, timeout=10)
        spec = ClientSpec(run="r", name="hospital-a", requests="builtin", state_dir=str(tmp_path))
        with pytest.raises(WorkerStepFailed) as caught:
            remote.handle("hello", spec, {}, {})
        assert caught.value.kind == "DataError" and SECRET_PROMPT in str(caught.value)  # local: full text
        text = client_app.shareable_error(caught.value)
        assert text.startswith("DataError") and SECRET_PROMPT not in text  # to the server: the kind
        server.stop(0)
        server = serve(socket, FailingWorker(WorkerError("no CollabEdit statistics held")))
        with pytest.raises(WorkerStepFailed) as caught:
            remote.handle("collab_masked", spec, {}, {})
        assert client_app.shareable_error(caught.value) == "WorkerError: no CollabEdit statistics held"
        remote.close()
    finally:
        server.stop(0)
