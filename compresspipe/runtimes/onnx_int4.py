"""`onnx_int4`: 4-bit weight-only ONNX, ONNX Runtime's MatMulNBits kernels (decoder LMs, any Linear-heavy model).

The float ONNX graph of the model before the quantize stage is written, and ONNX Runtime's own block quantizer
(`MatMulNBitsQuantizer`: round-to-nearest, or HQQ when the stage chose `algorithm: hqq`) replaces the MatMul of
every layer the quantize stage held in 4 bits with a MatMulNBits node: weights in 4-bit blocks of the stage's
`group_size` along the input, a float scale and a zero point per block (4-bit; float for HQQ), activations and the
rest of the graph float. It is the quantizer the stage's PyTorch layers (`compresspipe.stages.quantize.nbits`) call,
so both hold the same weights. Gemm nodes (a Linear on a 2-D input) are first rewritten as MatMul + Add so that
they are quantized too. What stays float and why (embedding tables, layers the recipe excluded) reaches the notes;
nothing is skipped silently.

Verified against the float model it came from (deploy.fidelity: top-1 agreement, per token for language models,
and the task metric).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from compresspipe.runtimes.job import Exporter, ExportJob, warnings_as_notes
from compresspipe.runtimes.onnx_float import (
    add_metadata,
    available,
    set_metadata,
    strip_debug_info,
    verify_onnx,
    write_onnx,
)

DEFAULT_BLOCK = 32
# int4_compute -> MatMulNBits' accuracy_level (4: int8 activations; 0: as the weights' float type)
ACCURACY_LEVEL = {"int8": 4, "float": 0}


def handoff(job: ExportJob) -> Any:
    """The quantize stage's int4 settings, or the defaults (every MatMul weight, blocks of 32, round-to-nearest)."""
    from compresspipe.runtimes.handoff import OnnxInt4Handoff, QuantizeRecord

    record = job.state.get(QuantizeRecord)
    if record is not None and record.onnx_int4 is not None:
        return record.onnx_int4
    return OnnxInt4Handoff(block_size=DEFAULT_BLOCK, compute="int8")


def _layer(node_name: str) -> str:
    """The torch module an exported node belongs to: its name up to the last '/' (the exporter's scope)."""
    return node_name.rsplit("/", 1)[0] if "/" in node_name else node_name


def gemm_to_matmul(model: Any) -> int:
    """Rewrite each Gemm with a constant weight (alpha = beta = 1, A not transposed) as MatMul + Add, in place:
    MatMulNBits replaces MatMul only. Returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    changed = 0
    for index, node in list(enumerate(graph.node)):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = f"{node.input[1]}_kn"
        graph.initializer.append(numpy_helper.from_array(weight, name))
        scope = _layer(node.name) if node.name else f"gemm{index}"
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], name], [product], name=f"{scope}/MatMul")]
        if has_bias:
            new.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{scope}/Add"))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(position + offset, n)
        changed += 1
    if changed:  # the transposed originals are read by nothing now
        read = {i for n in graph.node for i in n.input}
        for tensor in [t for t in graph.initializer if t.name not in read]:
            graph.initializer.remove(tensor)
    return changed


def untie_transposed_weights(model: Any, wanted: Callable[[Any], bool] = lambda node: True) -> int:
    """A MatMul that reads a constant through a Transpose (a language model head tied to its embedding table) reads
    the transposed constant itself, in place, so it can hold 4-bit weights; the embedding keeps its float table.
    Only MatMul nodes `wanted` accepts (a head kept float keeps reading the shared table: no second copy). Returns
    how many."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or not wanted(node):
            continue
        up = producer.get(node.input[1])
        if up is None or up.op_type != "Transpose" or up.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in up.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[up.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{up.input[0]}_transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(weight.T.copy(), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        changed += 1
    if changed:  # a Transpose nothing reads any more goes
        read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in read]:
            graph.node.remove(node)
    return changed


def weight_nodes(model: Any) -> list[Any]:
    """MatMul, Gemm and Gather nodes that read a constant 2-D weight (what holds a layer's parameters)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits \
                and len(inits[node.input[1]].dims) == 2 or node.op_type == "Gather" and node.input and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            out.append(node)
    return out


def export(job: ExportJob, folder: Path) -> list[Path]:
    from compresspipe.runtimes.onnx_int8 import runtime_logs_held

    with runtime_logs_held():  # ONNX Runtime's quantizer logs every node at INFO on the root logger
        return _export(job, folder)


def _export(job: ExportJob, folder: Path) -> list[Path]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from compresspipe.runtimes.handoff import ALGORITHM_LABELS

    out = folder / "model.int4.onnx"
    scratch = folder / ".model.float.onnx"
    hand = handoff(job)
    try:
        source = write_onnx(job.float_module or job.module, job, scratch)[0]
        model = onnx.load(str(source))
        rewritten = gemm_to_matmul(model)
        wanted = set(hand.layers)
        named = any(_layer(n.name) in wanted for n in model.graph.node if n.op_type == "MatMul")
        untie_transposed_weights(model, lambda node: not wanted or not named or _layer(node.name) in wanted)
        matmuls = [n for n in weight_nodes(model) if n.op_type == "MatMul"]
        chosen = [n.name for n in matmuls if not wanted or _layer(n.name) in wanted]
        if wanted and not chosen:  # the exporter named its nodes otherwise: every weight MatMul, said below
            chosen = [n.name for n in matmuls]
            job.notes.append("model.int4.onnx: no ONNX node carried the quantize stage's layer names; every MatMul "
                             "with a weight is 4-bit")
        config = (HQQWeightOnlyQuantConfig(block_size=hand.block_size, bits=4) if hand.algorithm == "hqq" else
                  DefaultWeightOnlyQuantConfig(block_size=hand.block_size, is_symmetric=hand.symmetric))
        # nodes_to_include only adds to the MatMul op type the quantizer takes anyway: what stays float is excluded
        others = [n.name for n in matmuls if n.name not in chosen]
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=hand.block_size, is_symmetric=hand.symmetric,
                                         nodes_to_include=chosen, nodes_to_exclude=others, algo_config=config)
        with warnings_as_notes(job, out.name):  # e.g. HQQ's torch.from_numpy of a read-only weight
            quantizer.process()
        level = ACCURACY_LEVEL[hand.compute]
        for node in quantizer.model.model.graph.node:  # the quantizers of both algorithms leave it unset
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    finally:
        for path in (scratch, scratch.with_name(scratch.name + ".data")):
            path.unlink(missing_ok=True)
    result = onnx.load(str(out))
    packed = [n for n in result.graph.node if n.op_type == "MatMulNBits"]
    floats = weight_nodes(result)
    reasons: dict[str, str] = {}
    for node in floats:
        layer = _layer(node.name) if node.name else node.output[0]
        if node.op_type == "Gather":
            reasons[layer] = "embedding table (a lookup: float, as in ONNX Runtime's generation models)"
        elif node.op_type == "Gemm":
            reasons[layer] = "Gemm with a transposed input or a scale (MatMulNBits replaces plain MatMul only)"
        elif wanted and layer not in wanted:
            reasons[layer] = "not 4-bit in the quantize stage (include/exclude, or a layer type it keeps float)"
        else:
            reasons[layer] = "ONNX Runtime's block quantizer left it float (its input width is too small)"
    for layer, why in hand.float_layers.items():  # what the stage kept float (a tied head reads the embedding)
        reasons[layer] = why
    in_file = {_layer(n.name) for n in packed if n.name}
    missing = [layer for layer in hand.layers if layer not in in_file]
    if wanted and in_file and missing:  # 4-bit in PyTorch, float in the file: never silently
        for layer in missing:
            reasons.setdefault(layer, "4-bit in PyTorch, but no MatMul of the exported graph holds its weight")
    job.float_layers = sorted(reasons)
    strip_debug_info(out, job.config.keep_names)
    add_metadata(out, job)
    set_metadata(out, {"compresspipe.weight_bits": "4", "compresspipe.block_size": str(hand.block_size),
                       "compresspipe.float_layers": ",".join(sorted(reasons))})
    gemms = f", {rewritten} Gemm(s) rewritten as MatMul + Add first" if rewritten else ""
    job.notes.append(f"model.int4.onnx: {len(packed)} MatMul(s) run as ONNX Runtime MatMulNBits (4-bit weights, "
                     f"blocks of {hand.block_size}, {'symmetric' if hand.symmetric else 'asymmetric'}, "
                     f"{ALGORITHM_LABELS[hand.algorithm]}; "
                     + ("int8 compute: activations rounded to int8 per block, accuracy_level 4"
                        if hand.compute == "int8" else "float activations") + f"){gemms}")
    if reasons:
        job.notes.append("model.int4.onnx: weights kept float: " + "; ".join(f"{k}: {v}" for k, v in
                                                                               sorted(reasons.items())))
    return [out]


EXPORTERS = {
    "onnx_int4": Exporter(
        "onnx_int4", "model.int4.onnx", available, export, verify_onnx, int8=True,
        load_snippet=("import onnxruntime as ort; sess = ort.InferenceSession('model.int4.onnx')",
                      "logits = sess.run(None, feed)[0]  # one entry per named input (input_ids, attention_mask)"),
    ),
}
