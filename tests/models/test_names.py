"""Recipes are checked against the names the installed timm and transformers know, read from the libraries (no
table kept by hand), once per library version, without importing torch into a process that has not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from compresspipe.models import library_names
from compresspipe.models.library_names import HF_TASK_MAPPINGS, installed_version, names


@pytest.fixture(autouse=True)
def _fresh():
    names.cache_clear()
    yield
    names.cache_clear()


def test_the_names_are_the_installed_libraries():
    timm = pytest.importorskip("timm")
    assert names("timm")["models"] == set(timm.list_models())
    pytest.importorskip("transformers")
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    hf = names("transformers")
    assert hf["model_types"] == set(CONFIG_MAPPING_NAMES) and "llama" in hf["language_modeling"]
    for task, mapping in HF_TASK_MAPPINGS.items():
        assert hf[task] == set(getattr(modeling_auto, mapping)), task


def test_names_are_kept_per_library_version(tmp_path):
    pytest.importorskip("timm")
    kept = tmp_path / ".cache" / "names" / f"timm-{installed_version('timm')}.json"
    assert "resnet18" in names("timm")["models"] and kept.is_file()
    kept.write_text(json.dumps({"models": ["only_this"]}))  # what a later process reads instead of importing timm
    names.cache_clear()
    assert names("timm")["models"] == {"only_this"}
    kept.write_text("{torn")  # a damaged file is read afresh from the library
    names.cache_clear()
    assert "resnet18" in names("timm")["models"]
    for edited in ('{"models": [1, 2]}', '{"other": ["x"]}', "[]"):  # edited by hand: read afresh too
        kept.write_text(edited)
        names.cache_clear()
        assert "resnet18" in names("timm")["models"], edited


def test_a_child_that_cannot_read_the_names_is_a_recipe_error_not_a_traceback(monkeypatch):
    """Without torch in the process the names come from a child; its failure (or a hang) is a ValueError, which the
    recipe loader reports at the key that named the model (exit 2)."""
    import subprocess

    monkeypatch.setattr(library_names, "_cache_file", lambda library, version: library_names.Path("/nonexistent/x"))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(subprocess.TimeoutExpired("py", 300)))
    with pytest.raises(ValueError, match=r"could not read the names timm knows \(TimeoutExpired"):
        names("timm")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "not json\n", ""))
    names.cache_clear()
    with pytest.raises(ValueError, match="could not read the names timm knows"):
        names("timm")


def test_a_library_that_is_not_installed_is_named(monkeypatch):
    monkeypatch.setattr(library_names, "installed_version", lambda library: None)
    with pytest.raises(ValueError, match=r"timm is not installed \(pip install 'compresspipe\[timm\]'\)"):
        names("timm")


def test_checking_a_recipe_imports_no_torch(tmp_path):
    """A cold cache: the names come from a child process; this one never imports torch."""
    pytest.importorskip("timm")
    code = ("import sys; from compresspipe.recipe.spec import ModelSpec; "
            "ModelSpec.model_validate({'timm': 'resnet18'}); assert 'torch' not in sys.modules")
    env = {**os.environ, "COMPRESSPIPE_CACHE": str(tmp_path / "cold")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    assert list((tmp_path / "cold" / "names").glob("timm-*.json"))
