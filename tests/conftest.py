from __future__ import annotations

import os

import pytest

# Plugins installed in the developer's environment must not change what the tests see.
os.environ.setdefault("COMPRESSPIPE_NO_PLUGINS", "1")


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    """Tests leave no files behind: default run folders (runs/...) and the sensitivity cache land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COMPRESSPIPE_CACHE", str(tmp_path / ".cache"))
