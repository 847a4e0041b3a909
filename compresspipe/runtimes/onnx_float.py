"""`onnx`: one self-contained .onnx file through torch's dynamo exporter, verified in onnxruntime.

The dynamo exporter writes opset >= 18 only; a lower opset, or a model the dynamo exporter cannot
capture, goes through the older TorchScript-based exporter (noted in the report).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresspipe.models.inputs import args_and_kwargs, numpy_feed
from compresspipe.runtimes.job import (
    OUTPUT_NAME,
    Exporter,
    ExportJob,
    compare,
    dynamic_batch_shapes,
    onnx_axes,
    per_sample,
    time_batches,
    warnings_as_notes,
)

DYNAMO_MIN_OPSET = 18
# protobuf cannot hold a single file over 2 GiB; larger models keep their weights in model.onnx.data
SINGLE_FILE_LIMIT = 1_800_000_000


def available() -> str | None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install onnx onnxscript onnxruntime)"
    return None


def _inference_form(module: nn.Module, job: ExportJob, path: Path) -> tuple[nn.Module, int]:
    """models.reparam.inference_form, or the model as it is (with a note) when a block cannot fold."""
    from compresspipe.models.reparam import inference_form

    try:
        return inference_form(module)
    except Exception as exc:  # a block's own folding code failed: the training form is still the same function
        job.notes.append(f"{path.name}: could not fold the model's re-parameterizable blocks ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); written in its training form")
        return module, 0


def write_onnx(module: nn.Module, job: ExportJob, path: Path) -> list[Path]:
    """Export `module` to `path` (plus path.data for huge models); returns the files written.

    The file's inputs are the model's (`input`, or its named inputs such as input_ids and attention_mask), with
    the batch axis and the spec's dynamic axes (e.g. sequence) symbolic; its metadata names the classes.
    Blocks that train with parallel branches (RepVGG, MobileOne, RepGhost) are written folded (models.reparam)."""
    module, folded = _inference_form(module, job, path)
    opset = job.config.opset
    dynamic = job.config.dynamic_batch
    example = job.example(2 if dynamic else 1)
    args, kwargs = args_and_kwargs(example)
    names = job.input_names
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > SINGLE_FILE_LIMIT
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    from compresspipe.runtimes import onnx_cache

    key = None if big else onnx_cache.fingerprint(module, {
        "opset": opset, "dynamic": dynamic, "keep_names": job.config.keep_names, "names": names,
        "example": [(k, str(v.dtype), tuple(v.shape)) for k, v in (example.items() if isinstance(example, dict)
                                                                     else [("input", example)])],
        "io": job.io.model_dump(mode="json"), "axes": repr(dynamic_batch_shapes(job))})
    cached = onnx_cache.lookup(key, path)
    if cached is not None:  # this process exported the same model with the same settings: the same file
        job.notes.extend(n for n in cached.notes if n not in job.notes)
        add_metadata(path, job)
        if cached.meta:
            set_metadata(path, cached.meta)
        return [path]
    noted = len(job.notes)
    if folded:
        job.notes.append(f"{path.name}: written from the model's inference form: {folded} block(s) that train "
                         "with parallel branches folded into single convolutions (their reparameterize(); the "
                         "PyTorch model keeps its training form)")
    dynamo_error = None
    from compresspipe.runtimes.kv_cache import export_kv, language_model

    lm = language_model(module, job.io.task)
    kv_meta: dict[str, str] = {}
    if lm is not None and opset >= DYNAMO_MIN_OPSET:
        first = next(iter(example.values())) if isinstance(example, dict) else example
        try:
            with _quiet(job, path.name):
                kv_meta = export_kv(lm, path, opset, batch=int(first.shape[0]), seq=int(first.shape[1]),
                                    external_data=big)
        except Exception as exc:  # the file is still written, without a cache, and the notes say why
            job.notes.append(f"{path.name}: could not export with a key/value cache ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); the file "
                             "recomputes the whole sequence at every step")
            for stale in (path, path.with_name(path.name + ".data")):
                stale.unlink(missing_ok=True)
    if not kv_meta and opset >= DYNAMO_MIN_OPSET:
        try:
            with _quiet(job, path.name):
                torch.onnx.export(
                    module, args, str(path), kwargs=kwargs or None, dynamo=True, verbose=False, opset_version=opset,
                    input_names=names, output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_batch_shapes(job),
                    external_data=big,
                )
        except Exception as exc:  # the exporter raises many types; fall back and say why
            dynamo_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if not kv_meta and (opset < DYNAMO_MIN_OPSET or dynamo_error is not None):
        why = (f"the dynamo exporter failed ({dynamo_error[:200]})" if dynamo_error
               else f"opset {opset} is below the dynamo exporter's minimum ({DYNAMO_MIN_OPSET})")
        job.notes.append(f"{path.name}: {why}; used the TorchScript-based exporter (dynamo=False)")
        positional = args if args else tuple(kwargs[n] for n in names)
        with _quiet(job, path.name):
            torch.onnx.export(module, positional, str(path), dynamo=False, opset_version=opset,
                              input_names=names, output_names=[OUTPUT_NAME], dynamic_axes=onnx_axes(job) or None)
    data = path.with_name(path.name + ".data")
    if not big:  # merge any external-data file: one self-contained file ships easier
        strip_debug_info(path, job.config.keep_names)
        data.unlink(missing_ok=True)
        onnx_cache.store(key, [path], job.notes[noted:], kv_meta)
    add_metadata(path, job)
    if kv_meta:
        set_metadata(path, kv_meta)
    return [path] + ([data] if data.exists() else [])


def add_metadata(path: Path, job: ExportJob) -> None:
    """Say in the file what its outputs and inputs are: the task, the class of each output index, the inputs'
    preprocessing (ONNX metadata_props, read with `sess.get_modelmeta().custom_metadata_map`)."""
    import json

    io = job.io
    entries = {"compresspipe.task": io.task,
               "compresspipe.inputs": json.dumps([i.model_dump(mode="json") for i in io.inputs])}
    if io.classes is not None:
        entries["compresspipe.classes"] = json.dumps(io.classes)
    if io.preprocessing:
        entries["compresspipe.preprocessing"] = json.dumps(io.preprocessing)
    longest = max_positions(job.module)
    if longest is not None:  # a language model's context: what a runtime may feed it
        entries["compresspipe.max_sequence_length"] = str(longest)
    set_metadata(path, entries)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(module: Any) -> int | None:
    """The longest sequence a Hugging Face model's config allows (itself or the model it wraps), else None."""
    for m in (module, getattr(module, "model", None)):
        config = getattr(m, "config", None)
        for key in POSITION_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def set_metadata(path: Path, entries: dict[str, str]) -> None:
    """Set these metadata_props of an ONNX file (others kept), read with `custom_metadata_map`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def strip_debug_info(path: Path, keep_names: bool = True) -> None:
    """Drop what does not change the computation: the exporter's per-node debug metadata (stack traces with
    build-machine paths, fx node text), inferred shapes of intermediate tensors, and, unless `keep_names`,
    the long node and tensor names (short ids instead; the graph's input and output names stay).

    All of it is often a large share of a small model's file.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    scopes = [node_scope(node) for node in model.graph.node]
    graphs = [model.graph]
    nested = False
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:  # subgraphs (If/Loop bodies)
                inner = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                nested = nested or bool(inner)
                graphs += inner
    if not nested:  # subgraphs may name outer tensors: renaming or dropping them is not worth the risk
        drop_unused_initializers(model.graph)
        if not keep_names:
            compact_names(model.graph, dict(enumerate(scopes)))
    onnx.save(model, str(path), save_as_external_data=False)


def node_scope(node: Any) -> str | None:
    """The PyTorch module a node was exported from (`features.3.conv`), from the dynamo exporter's metadata."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)  # a list of str, written by the exporter; literals only
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and all(isinstance(x, str) for x in scopes):
                return scopes[-2] or scopes[-1] or None  # a top-level op: its own name (`cat`, `slice_1`)
    return None


def drop_unused_initializers(graph: Any) -> int:
    """Remove initializers no node reads (ONNX Runtime warns about each one on every load)."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    return len(unused)


def compact_names(graph: Any, scopes: dict[int, str | None] | None = None) -> None:
    """Rename internal tensors to short ids and nodes to the PyTorch module they came from (`layer1.0.conv1/Conv`,
    so int8 exclusions and reports can name layers), else a short id; drop intermediate value_info."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in renamed:
            renamed[name] = f"t{len(renamed):x}"
        return renamed[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = short(sparse.values.name)
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        scope = (scopes or {}).get(i)
        name = f"{scope}/{node.op_type}" if scope else f"n{i}"
        k = 1
        while name in used:
            k += 1
            name = f"{scope}/{node.op_type}_{k}" if scope else f"n{i}_{k}"
        used.add(name)
        node.name = name
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]


@contextlib.contextmanager
def _quiet(job: ExportJob, step: str) -> Iterator[None]:
    """The exporters print progress (dropped) and warn about deprecated paths (kept, as the stage's notes)."""
    with warnings_as_notes(job, step), contextlib.redirect_stdout(io.StringIO()):
        yield


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    from compresspipe.runtimes.kv_cache import KVSession, has_cache

    return KVSession(sess) if has_cache(sess) else sess


ONNX_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def feed_types(sess: Any) -> tuple[list[str], dict[str, str]]:
    """(the graph's input names, the numpy dtype each takes)."""
    inputs = sess.get_inputs()
    return [i.name for i in inputs], {i.name: ONNX_NUMPY.get(i.type, "float32") for i in inputs}


def verify_onnx(files: list[Path], job: ExportJob) -> dict[str, Any]:
    """Run the .onnx in onnxruntime (intra-op threads = evaluate.latency.threads) on the verification batches."""
    threads = job.latency.threads if job.latency is not None else 1
    sess = session(files[0], threads)
    names, dtypes = feed_types(sess)

    def run(x: Any) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, numpy_feed(x, names, dtypes))[0])

    runner = run if job.config.dynamic_batch else per_sample(run)
    metrics = compare(job, runner)
    metrics["latency_ms"] = time_batches(job, lambda feed: sess.run(None, feed),
                                         None if job.config.dynamic_batch else [1],
                                         prepare=lambda x: numpy_feed(x, names, dtypes))
    metrics["runtime"] = f"onnxruntime ({threads} thread{'s' if threads != 1 else ''})"
    from compresspipe.runtimes.kv_cache import KVSession

    if isinstance(sess, KVSession):
        metrics["generation"] = _generation(files[0], sess, job, threads)
    return metrics


GENERATED_TOKENS = 8  # greedy tokens checked per prompt
PROMPTS = 2


def _generation(path: Path, sess: Any, job: ExportJob, threads: int) -> dict[str, Any]:
    """Greedy decoding through the file's key/value cache against the PyTorch model's (whole sequence each step),
    on the first validation prompts; and prefill / decode tokens per second at batch 1."""
    from compresspipe.runtimes.kv_cache import decode_speed, greedy, greedy_torch
    from compresspipe.runtimes.memory import peak_memory

    x = job.batches[0][0]
    ids, mask = x["input_ids"], x.get("attention_mask")
    length = min(8, ids.shape[1] - 1)
    prompts = []
    for row in range(min(PROMPTS, ids.shape[0])):
        if mask is None or bool(mask[row, :length].all()):
            prompts.append(ids[row : row + 1, :length].to(torch.long))
    matched = identical = 0
    for prompt in prompts:
        ours = greedy(sess.raw, prompt.numpy(), GENERATED_TOKENS)
        theirs = greedy_torch(job.module, prompt, GENERATED_TOKENS)
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        matched += same
        identical += int(same == GENERATED_TOKENS)
    speed = decode_speed(sess.raw, batch=1, prompt=16, tokens=16)
    memory = peak_memory(path, 1, threads, prompt=16, tokens=16)
    out = {"prompts": len(prompts), "tokens": GENERATED_TOKENS, "matched_tokens": matched,
           "identical_sequences": identical, **speed, "peak_memory_mib": memory and memory["peak_mib"]}
    peak = "" if memory is None else (f", peak resident memory {memory['peak_mib']:.0f} MiB (ONNX Runtime alone "
                                      f"{memory['runtime_mib']:.0f} MiB)")
    job.notes.append(f"{path.name}: greedy decoding through its key/value cache: {identical} of {len(prompts)} "
                     f"prompt(s) give PyTorch's {GENERATED_TOKENS} tokens exactly ({matched} of "
                     f"{len(prompts) * GENERATED_TOKENS} tokens match); at batch 1, {threads} thread(s): prefill "
                     f"{speed['prefill_tokens_per_s']:.0f} tokens/s, decode {speed['decode_tokens_per_s']:.0f} "
                     f"tokens/s{peak}")
    return out


def export(job: ExportJob, folder: Path) -> list[Path]:
    files = write_onnx(job.module, job, folder / "model.onnx")
    if any(e.get("kind") == "quantize" for e in job.state.edits):
        job.notes.append("model.onnx: a float emulation of the quantize stage's int8 arithmetic (int8 weights "
                         "times their scales, activations rounded to the calibrated grid in float ops); ONNX "
                         "Runtime's float ops round an activation to the neighbouring level now and then, so its "
                         "logits differ from PyTorch's by the max |diff| in the table, and it is not faster. "
                         "model.int8.onnx (format onnx_int8) runs int8 kernels")
    job.shared["onnx"] = files[0]
    return files


EXPORTERS = {
    "onnx": Exporter(
        "onnx", "model.onnx", available, export, verify_onnx,
        load_snippet=("import onnxruntime as ort; sess = ort.InferenceSession('model.onnx')",
                      "logits = sess.run(None, {'input': x.astype('float32')})[0]  # or one entry per named input"),
    ),
}
