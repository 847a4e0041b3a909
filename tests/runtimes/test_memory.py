"""Peak resident memory of a file that generates, measured in a process of its own (runtimes/memory.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from compresspipe.runtimes.memory import peak_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _cache_file(path, vocab: int) -> None:
    """A minimal file with the key/value cache interface: logits = rows of a [vocab, vocab] table (its weights:
    vocab² floats), the cache grows by one [1, seq, 4] slice per call."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, vocab)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((vocab, 4)).astype(np.float32), "kv"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis")]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["logits"]),
             helper.make_node("Gather", ["kv", "input_ids"], ["step"]),
             helper.make_node("Unsqueeze", ["step", "axis"], ["new"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])]
    for kv in ("key", "value"):
        inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT, ["b", 1, "p", 4]))
        outputs.append(helper.make_tensor_value_info(f"present.0.{kv}", TensorProto.FLOAT, ["b", 1, "t", 4]))
        nodes.append(helper.make_node("Concat", [f"past_key_values.0.{kv}", "new"], [f"present.0.{kv}"], axis=2))
    graph = helper.make_graph(nodes, "cache", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_file_that_holds_more_weights_needs_more_memory(tmp_path):
    small, large = tmp_path / "small.onnx", tmp_path / "large.onnx"
    _cache_file(small, 64)  # 16 KiB of weights
    _cache_file(large, 4096)  # 64 MiB of weights
    a, b = peak_memory(small, 1, 1, prompt=4, tokens=3), peak_memory(large, 2, 1, prompt=4, tokens=3)
    assert a is not None and b is not None
    for got in (a, b):  # the runtime's own memory is measured, and the peak includes it
        assert 10 < got["runtime_mib"] < got["peak_mib"]
        assert got["file_mib"] == pytest.approx(got["peak_mib"] - got["runtime_mib"])
    assert a["file_mib"] < 32 <= 64 <= b["file_mib"]


def test_a_file_the_child_cannot_run_has_no_figure(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    assert peak_memory(bad, 1, 1) is None
    assert peak_memory(tmp_path / "missing.onnx", 1, 1) is None
