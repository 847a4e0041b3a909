"""report.json rows from the files that ship: what an int8 file that does not pay says."""

from __future__ import annotations

from compresspipe.report.build import build_report


def _row(index: int, name: str, fmt: str, b1: float, b64: float) -> dict:
    entry = {"files": ["f"], "bytes": 1000, "accuracy": 0.9, "loss": 0.1, "agreement": 1.0, "max_abs_diff": 0.0,
             "latency_ms": {"1": b1, "64": b64}, "latency_iqr_ms": {"1": [b1, b1], "64": [b64, b64]},
             "speedup": {}, "speedup_iqr": {}}
    return {"index": index, "name": name, "type": name, "kind": "weights", "folder": f"{index:02d}-{name}",
            "accuracy": 0.9, "loss": 0.1, "params": 10, "nonzero_params": 10, "sparsity": 0.0, "bytes": 4000,
            "macs": 10, "latency_ms": {}, "notes": [], "deploy": {"runtime": "onnxruntime", "format": fmt},
            "formats": {fmt: entry}}


def test_an_int8_file_slower_than_the_float_one_before_it_says_so():
    rows = [_row(0, "baseline", "onnx", 0.02, 0.7), _row(1, "train", "onnx", 0.02, 0.7),
            _row(2, "prune", "onnx", 0.008, 0.2), _row(3, "quantize", "onnx_int8", 0.009, 0.1)]
    report = build_report("r", rows, "train", "complete")
    notes = report["stages"][3]["notes"]
    assert any("int8 does not pay here: at batch 1" in n and "'prune'" in n for n in notes), notes
    assert not any("batch 64" in n for n in notes)  # at batch 64 it pays
    assert report["stages"][3]["format"] == "onnx_int8" and report["stages"][3]["bytes"] == 1000


def test_a_pruned_file_slower_than_its_source_says_so_and_names_the_misaligned_channels():
    rows = [_row(0, "baseline", "onnx", 0.3, 3.2), _row(1, "train", "onnx", 0.3, 3.4),
            _row(2, "prune", "onnx", 0.6, 3.0), _row(3, "quantize", "onnx_int8", 0.2, 1.0)]
    rows[2]["kind"] = "structural"
    rows[2]["details"] = {"tables": {"per layer": [
        {"layer": "layers.0", "shape before": "16x3x3x3", "shape after": "12x3x3x3"},  # 16 -> 12: off the block
        {"layer": "layers.6", "shape before": "8x16x1x1", "shape after": "8x12x1x1"},  # its outputs kept whole
        {"layer": "layers.7", "shape before": "12x8x1x1", "shape after": "9x8x1x1"}]}}  # never aligned
    report = build_report("r", rows, "train", "complete")
    notes = [n for n in report["stages"][2]["notes"] if n.startswith("pruning does not pay here")]
    assert len(notes) == 1 and "batch 1 (0.600 ms vs 0.300 ms)" in notes[0] and "batch 64" not in notes[0], notes
    assert "'train'" in notes[0] and "1 layer(s)" in notes[0] and "layers.0: 16 -> 12" in notes[0]
    assert "round_to: 8" in notes[0]
    rows[2]["formats"]["onnx"]["latency_ms"] = {"1": 0.2, "64": 3.0}  # the shipped file is faster: nothing to say
    report = build_report("r", rows, "train", "complete")
    assert not any(n.startswith("pruning does not pay") for n in report["stages"][2]["notes"])
