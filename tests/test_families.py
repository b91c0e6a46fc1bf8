"""The model-family spec: one place per family, written into every export's manifest for the C/C++ host."""

import json
import shutil

import pytest

from sdrt.builtin import builtin_model_dir
from sdrt.contracts import build_contracts
from sdrt.errors import ModelError
from sdrt.families import FAMILIES, family_spec
from sdrt.model.manifest import read_manifest
from sdrt.model.facts import read_model_facts
from sdrt.schedulers import SCHEDULER_NAMES, make_scheduler, scheduler_defaults


def test_export_manifest_carries_the_family_spec(onnx_sd2, tiny_sd2):
    data = json.loads((onnx_sd2 / "manifest.json").read_text())
    family = data["family"]
    assert family["name"] == read_model_facts(tiny_sd2).family == "sd2"
    assert family["networks"] == list(data["contracts"]) == list(FAMILIES["sd2"].networks)
    assert set(family["conditioning"]) <= {t["name"] for t in data["contracts"]["unet"]["inputs"]}
    # The defaults the C/C++ host reads resolve a config exactly as make_scheduler does.
    assert family["schedulers"] == json.loads(json.dumps(scheduler_defaults()))
    for name in SCHEDULER_NAMES:  # every name's class has its defaults there (under its class's first name)
        assert type(make_scheduler(name, {})).DEFAULTS in family["schedulers"].values()


def test_contracts_come_from_the_family(tiny_sd1):
    facts = read_model_facts(tiny_sd1)
    assert list(build_contracts(facts)) == list(family_spec(facts.family).networks)


def test_manifest_with_unknown_or_inconsistent_family_is_refused(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(builtin_model_dir(), folder)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data["family"]["name"] = "sdxl-from-the-future"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="sdxl-from-the-future.*upgrade"):
        read_manifest(folder)
    data["family"]["name"] = "sd2"  # the facts say sd1
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="family 'sd2' but its facts say 'sd1'"):
        read_manifest(folder)
    del data["family"]  # an export made before the section existed still loads, with its facts' family
    path.write_text(json.dumps(data))
    assert read_manifest(folder).family_section()["name"] == "sd1"
