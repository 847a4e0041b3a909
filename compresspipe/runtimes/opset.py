"""Can the installed onnxruntime run an opset? Asked at validation, so a recipe fails before any stage runs.

The exporter writes opsets that onnx knows, but onnxruntime may lack kernels for the newest versions of
some ops (onnxruntime 1.32 has no QuantizeLinear for opset 28). A tiny graph with the ops our files use
is loaded at the requested opset; only opsets above the default are probed, so a plain recipe imports
nothing here.
"""

from __future__ import annotations

import functools

PROBED_ABOVE = 18  # the default opset; onnxruntime has run it for years


def _probe(opset: int, int8: bool) -> str | None:
    """None if onnxruntime loads a Conv/Gemm graph (with QDQ when int8) at `opset`, else its error."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(value, name)

    nodes, inits, x = [], [], "input"
    if int8:
        inits += [const("s", np.array(0.1, np.float32)), const("z", np.array(0, np.uint8))]
        nodes += [helper.make_node("QuantizeLinear", [x, "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        x = "dq"
    inits += [const("w", np.ones((1, 1, 1, 1), np.float32)), const("g", np.ones((16, 2), np.float32)),
              const("b", np.zeros(2, np.float32)), const("shape", np.array([1, 16], np.int64))]
    nodes += [helper.make_node("Conv", [x, "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
              helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[1, 1]),
              helper.make_node("Reshape", ["p", "shape"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["m"]),
              helper.make_node("Add", ["m", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])], inits)
    opsets = [helper.make_opsetid("", opset)]
    # the oldest IR version that can carry this opset, so an IR newer than onnxruntime reads is not the failure
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        return str(exc).strip().splitlines()[0][:200]
    return None


@functools.cache
def runtime_problem(opset: int, int8: bool) -> str | None:
    """Why onnxruntime cannot run files of this opset, with the highest opset it can; None if it can."""
    if opset <= PROBED_ABOVE:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None  # the missing package is reported on its own
    error = _probe(opset, int8)
    if error is None:
        return None
    best = next((o for o in range(opset - 1, PROBED_ABOVE - 1, -1) if _probe(o, int8) is None), PROBED_ABOVE)
    return (f"onnxruntime {onnxruntime.__version__} cannot run opset {opset}{' int8 graphs' if int8 else ''} "
            f"({error}); use opset <= {best}")
