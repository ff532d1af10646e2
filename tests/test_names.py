"""Run and client names become folder names on every client: nothing from the run config or a node
config may point outside the state folder."""

import pytest
from pydantic import ValidationError

from fededit_core.client.worker import ClientSpec
from fededit_core.paths import safe_name
from strategies.session import FederationError
from strategies.settings import RunSettings

BAD = ["../victim", "..", ".hidden", "a/b", "a\\b", "", " x", "x\n", "é", "a" * 101, "/abs"]


@pytest.mark.parametrize("name", BAD)
def test_names_that_could_leave_the_state_folder_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="not a plain folder name"):
        safe_name(name)
    for field in ("run", "name"):
        spec = {"run": "r", "name": "client-0", "requests": "builtin", "state_dir": str(tmp_path), field: name}
        with pytest.raises(ValidationError, match="not a plain folder name"):
            ClientSpec(**spec)


@pytest.mark.parametrize("name", [n for n in BAD if n.strip()])
def test_run_settings_refuse_such_run_names(name):
    """(Surrounding white space is stripped first: `` x`` names the run ``x``.)"""
    if name.strip() != name:
        assert RunSettings.from_run_config({"run-name": name}).run == name.strip()
        return
    with pytest.raises(FederationError, match="not a plain folder name"):
        RunSettings.from_run_config({"run-name": name}, run_id=1)
    with pytest.raises(FederationError, match="not a plain folder name"):
        RunSettings(run=name)


@pytest.mark.parametrize("name", ["client-0", "hospital-a", "run-16830263983636438556", "sim-20261201.1_a"])
def test_plain_names_pass(name, tmp_path):
    assert safe_name(name) == name
    assert RunSettings.from_run_config({"run-name": name}).run == name
    assert ClientSpec(run=name, name=name, requests="builtin", state_dir=str(tmp_path)).run == name


def test_an_unnamed_run_is_named_by_its_flower_run_id():
    assert RunSettings.from_run_config({}, run_id=42).run == "run-42"
