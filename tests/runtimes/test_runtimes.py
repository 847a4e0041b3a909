"""The runtimes package: the file writers every stage and the deploy measurement share."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from compresspipe.runtimes import FORMAT_MODULES
from compresspipe.stages.export import FORMAT_ORDER


def test_the_torch_free_parts_import_no_torch():
    """The recipe layer validates formats, CPU targets and quantize hand-offs without torch."""
    code = ("import sys, compresspipe.runtimes, compresspipe.runtimes.handoff, compresspipe.runtimes.cpu, "
            "compresspipe.stages.export, compresspipe.stages.quantize; assert 'torch' not in sys.modules, "
            "[m for m in sys.modules if m.startswith('torch')][:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", FORMAT_ORDER)
def test_every_export_format_has_its_writer_here(fmt):
    module = importlib.import_module(FORMAT_MODULES[fmt])
    assert module.__name__.startswith("compresspipe.runtimes.")
    exporter = module.EXPORTERS[fmt]
    assert callable(exporter.available) and callable(exporter.export) and callable(exporter.verify)


def test_saved_quantize_records_still_load_by_kind():
    """model.json names a record by kind; the class moved below the stages and the stage package re-exports it."""
    from compresspipe.artifacts.records import record_from_json
    from compresspipe.runtimes.handoff import QuantizeRecord
    from compresspipe.stages.quantize import QuantizeRecord as FromStage

    record = record_from_json("quantize", {"version": 3, "method": "static", "float_stage": "train"})
    assert isinstance(record, QuantizeRecord) and FromStage is QuantizeRecord and record.int8
