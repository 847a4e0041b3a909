"""The name tables the recipe checks without importing timm or transformers match the installed libraries: a
different version would otherwise refuse its new models and accept removed ones. Regenerate with
`python -m compresspipe.models.generate_names` (and pin the version in pyproject.toml's extras)."""

from __future__ import annotations

import pytest

from compresspipe.models import hf_names, timm_names
from compresspipe.models.generate_names import HF_TASK_MAPPINGS

HINT = "the installed library drifted from the table: python -m compresspipe.models.generate_names"


def test_timm_table_is_the_installed_timm():
    timm = pytest.importorskip("timm")
    assert timm.__version__ == timm_names.TIMM_VERSION, HINT
    installed = set(timm.list_models())
    assert installed == set(timm_names.TIMM_MODELS), (HINT, sorted(installed ^ set(timm_names.TIMM_MODELS))[:10])


def test_transformers_tables_are_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert transformers.__version__ == hf_names.TRANSFORMERS_VERSION, HINT
    assert set(hf_names.HF_MODEL_TYPES) == set(CONFIG_MAPPING_NAMES), HINT
    for task, mapping in HF_TASK_MAPPINGS.items():
        assert set(getattr(hf_names, f"HF_{task.upper()}")) == set(getattr(modeling_auto, mapping)), (HINT, task)
