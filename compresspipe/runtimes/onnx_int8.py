"""`onnx_int8`: ONNX Runtime quantization of the float ONNX graph.

Static QDQ (per-channel int8 weights, uint8 activations calibrated on the calibration split) for graphs
with convolutions; dynamic quantization for Linear/RNN-only graphs and for transformers (graphs with attention:
their MatMul/Gemm weights and embedding tables go int8, softmax and LayerNorm stay float, convolutions such as
a ViT's patch embedding too, since ONNX Runtime's dynamic mode cannot run Conv). This is also how a model whose torch quantized modules cannot be exported reaches ONNX: the
float model before the quantize stage is exported and quantized here with the settings that stage recorded.
Verified by top-1 agreement (verify.min_agreement), since int8 logits differ from float ones by design.

After a quantize stage, the `QuantizeRecord` it put on the model (saved in model.json) names the float stage
whose model is quantized here, and its `onnx_int8` hand-off (method, per-channel weights, observer,
calibration batches and batch size, nodes to exclude) overrides the export stage's `int8` settings.

Weights use 7 bits (ONNX Runtime's reduce_range, |w| <= 64) unless deploy.cpu is x86-vnni or arm64: on x86
CPUs with AVX2 but no VNNI, ONNX Runtime's u8s8 kernels add pairs of products in int16 and saturate with
8-bit weights (`compresspipe.runtimes.cpu`), so a full 8-bit file is correct only on VNNI and ARM CPUs.

Two defaults make the file faster in ONNX Runtime (int8.float_small_convs, int8.float_output): convs with
a tiny reduction (a first conv on a 1-channel image) stay float, costing a few hundred bytes, and the
logits leave the last int8 layer in float rather than being rounded to 8 bits.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compresspipe.artifacts.files import sha256_file
from compresspipe.models.inputs import batch_len, numpy_feed
from compresspipe.runtimes import onnx_cache
from compresspipe.runtimes.cpu import WEIGHT_BITS, WEIGHT_LIMIT
from compresspipe.runtimes.job import Exporter, ExportJob, int8_settings
from compresspipe.runtimes.onnx_float import (
    add_metadata,
    available,
    set_metadata,
    strip_debug_info,
    verify_onnx,
    write_onnx,
)
from compresspipe.ui import UI

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# A conv summing over fewer inputs per output than this runs faster in float than in int8 in ONNX Runtime:
# digits-cnn's 1-channel 3x3 first conv is 5x slower at batch 64 as int8,
# while resnet18's 3x7x7 first conv is 1.6x faster as int8 and mobilenet_v2's 3x3x3 one breaks even.
SMALL_CONV_REDUCTION = 16
# a quantize stage's observer names, as ONNX Runtime calls them; histogram collects ONNX Runtime's entropy
# histograms, then picks each range with the observer's own L2 search (l2_ranges), not entropy's KL threshold
OBSERVER_TO_METHOD = {"minmax": "minmax", "histogram": "entropy", "entropy": "entropy", "percentile": "percentile"}


def settings(job: ExportJob) -> dict[str, Any]:
    """The file's calibration in ONNX Runtime's terms, from the job's one int8 settings object (`job.handoff`: the
    quantize stage's, else the export stage's `int8` block)."""
    hand = int8_settings(job)
    out: dict[str, Any] = {"method": hand.method, "per_channel": hand.per_channel,
                           "calibrate_method": OBSERVER_TO_METHOD[hand.observer],
                           "calibration_batches": hand.calibration_batches, "batch_size": hand.batch_size,
                           "extra_options": {}}
    if hand.observer == "percentile" and hand.percentile is not None:
        out["extra_options"] = {"CalibPercentile": hand.percentile}  # the same share as the PyTorch row keeps
    return out


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over the calibration split (batch 1 when the graph is fixed)."""

    def __init__(self, job: ExportJob, names: list[str], batch_size: int, batches: int, bar: Any = None):
        self.items = self._items(job, names, batch_size, batches)
        self.bar = bar

    @staticmethod
    def _items(job: ExportJob, names: list[str], batch_size: int, batches: int) -> Iterator[dict[str, np.ndarray]]:
        for x in job.calibration(batch_size, batches):
            feed = numpy_feed(x, names)
            if job.config.dynamic_batch:
                yield feed
            else:
                for i in range(batch_len(x)):
                    yield {k: v[i : i + 1] for k, v in feed.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        if item is not None and self.bar is not None:
            self.bar.advance(1)
        return item


@contextlib.contextmanager
def runtime_logs_held() -> Iterator[None]:
    """ONNX Runtime's quantization tools log advice and shape-inference doubts on the root logger; what matters
    reaches the report as notes, so those lines are held back from the terminal for the duration."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export(job: ExportJob, folder: Path) -> list[Path]:
    with runtime_logs_held():
        return _export(job, folder)


def _export(job: ExportJob, folder: Path) -> list[Path]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = folder / "model.int8.onnx"
    temp = [folder / ".model.float.onnx", folder / ".model.float.onnx.data", folder / ".model.pre.onnx"]
    try:
        if job.float_module is not None:
            source = write_onnx(job.float_module, job, temp[0])[0]
        elif "onnx" in job.shared:
            source = job.shared["onnx"]
        else:
            source = write_onnx(job.module, job, temp[0])[0]
        opts = settings(job)
        key = _int8_key(job, source, opts)
        hit = onnx_cache.lookup(key, out)
        if hit is not None:  # this process quantized the same float file with the same settings and data
            job.notes.extend(n for n in hit.notes if n not in job.notes)
            job.notes.append("model.int8.onnx: the int8 file an earlier row built from the same float model, "
                             "settings and calibration batches (reused, not calibrated again)")
            job.float_layers = list(hit.extra.get("float_layers", []))
            job.diagnosis = list(hit.extra.get("diagnosis", []))
            job.stability = hit.extra.get("stability")
            return [out]
        noted = len(job.notes)
        reduce_range = WEIGHT_BITS[job.cpu] == 7
        prepared = _preprocess(source, temp[2], job)
        graph_model = onnx.load(str(prepared))
        ops = {node.op_type for node in graph_model.graph.node}
        method = opts["method"]
        transformer = "Softmax" in ops and "MatMul" in ops  # attention: its matmuls, not its activations, go int8
        if method == "auto":
            method = "dynamic" if transformer or not ops & CONV_OPS else "static"
        if method == "dynamic" and ops & CONV_OPS and not transformer:
            job.notes.append("model.int8.onnx: dynamic quantization was asked for, but ONNX Runtime cannot run "
                             "dynamically quantized Conv; used static QDQ")
            method = "static"
        hand = int8_settings(job)
        excluded: list[str] = []
        keep = list(hand.keep_float)
        if keep:
            mapped, missing = layer_nodes(job.float_module or job.module, graph_model, keep, job.input_shape)
            excluded += [n for n in mapped if n not in excluded]
            job.notes.append(f"model.int8.onnx: {len(mapped)} layer(s) stay float (the quantize stage's keep_float: "
                             f"{', '.join(keep)})" + (f"; no ONNX node found for {', '.join(missing)}, quantized"
                                                      if missing else ""))
        if method == "static" and hand.float_small_convs:
            small = small_convs(graph_model)
            if small:
                excluded += [n for n in small if n not in excluded]
                job.notes.append(f"model.int8.onnx: {len(small)} conv(s) summing over fewer than "
                                 f"{SMALL_CONV_REDUCTION} inputs per output stay float (faster than int8 in "
                                 "ONNX Runtime; int8.float_small_convs)")
        calib = {"method": opts["calibrate_method"], "extra": dict(opts["extra_options"])}

        cache_ok = "calibration_cache_path" in inspect.signature(quantize_static).parameters
        # the quantize stage's histogram observer picks L2-optimal ranges: the file gets the same search, run on
        # the histograms ONNX Runtime collects (entropy calibration's), instead of entropy's KL thresholds
        l2 = cache_ok and hand.observer == "histogram"

        def quantize(exclude: list[str], only: list[str] | None = None, seven_bit: bool | None = None) -> None:
            """Write `out` with these nodes float (or with only these int8); the calibrated ranges of one
            calibration method are computed once and reused (ONNX Runtime's calibration cache). `seven_bit`
            overrides deploy.cpu's weight width (for the note that says what 8-bit weights would reach)."""
            narrow = reduce_range if seven_bit is None else seven_bit
            if method == "static":
                pct = calib["extra"].get("CalibPercentile")
                cache = folder / f".calibration.{calib['method']}{'' if pct is None else pct}.json"
                if cache not in temp:
                    temp.append(cache)
                cached = {"calibration_cache_path": str(cache)} if cache_ok else {}
                reader_cls = type("CalibrationReader", (_Calibration, CalibrationDataReader), {})
                names = [i.name for i in graph_model.graph.input]
                ui = job.ui or UI(quiet=True)
                # ONNX Runtime's percentile and entropy calibrators print their progress on stdout
                fresh = not cache.exists()
                with ui.progress(f"{job.stage}: calibrating model.int8.onnx", opts["calibration_batches"]) as bar, \
                        contextlib.redirect_stdout(io.StringIO()):
                    def run() -> None:
                        quantize_static(
                            str(prepared), str(out),
                            reader_cls(job, names, opts["batch_size"], opts["calibration_batches"], bar),
                            quant_format=QuantFormat.QDQ, per_channel=opts["per_channel"],
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[calib["method"]],
                            nodes_to_exclude=exclude or None, nodes_to_quantize=only, reduce_range=narrow,
                            extra_options=calib["extra"], **cached,
                        )

                    run()
                    if l2 and calib["method"] == "entropy" and fresh and cache.exists():
                        l2_ranges(cache)
                        run()  # from the rewritten ranges (a cache hit: no second calibration)
                if hand.float_output:
                    float_outputs(out)
            else:
                # MatMul/Gemm weights and embedding tables int8, activations quantized per call; convolutions (a
                # ViT's patch embedding) stay float: ONNX Runtime cannot run them dynamically quantized
                kinds = ["MatMul", "Gemm", "Gather", "Attention", "LSTM"] if ops & CONV_OPS or transformer else None
                quantize_dynamic(str(prepared), str(out), per_channel=opts["per_channel"], weight_type=QuantType.QInt8,
                                 nodes_to_exclude=exclude or None, reduce_range=narrow,
                                 op_types_to_quantize=kinds)

        quantize(excluded)
        if method == "static":
            _fit_fidelity(job, prepared, out, excluded, quantize, graph_model, calib, reduce_range)
            if job.diagnosis or job.stability:
                set_metadata(out, {DIAGNOSIS_KEY: json.dumps({"diverging": job.diagnosis,
                                                              "stability": job.stability})})
            opts["calibrate_method"] = ("histogram (the L2-optimal range search of the quantize stage's observer, on ONNX Runtime's "
                                        "histograms)" if l2 and calib["method"] == "entropy" else calib["method"])
        elif transformer:
            job.notes.append("model.int8.onnx: a transformer graph: dynamic int8 (weights of MatMul/Gemm and "
                             "embedding tables int8, activations quantized per call); softmax, LayerNorm and "
                             "convolutions stay float, where static int8 loses accuracy")
        strip_debug_info(out, job.config.keep_names)
        add_metadata(out, job)
        widest = weight_abs_max(out)
        if widest is not None and widest > WEIGHT_LIMIT[WEIGHT_BITS[job.cpu]]:
            raise RuntimeError(f"model.int8.onnx has int8 weights up to |{widest}|, more than deploy.cpu "
                               f"{job.cpu} allows ({WEIGHT_LIMIT[WEIGHT_BITS[job.cpu]]})")
        job.notes.append(f"model.int8.onnx: ONNX Runtime {method} int8, {8 if not reduce_range else 7}-bit weights "
                         f"for deploy.cpu {job.cpu}"
                         + (f" ({opts['calibrate_method']} calibration, "
                            f"{'per-channel' if opts['per_channel'] else 'per-tensor'} weights)"
                            if method == "static" else ""))
        onnx_cache.store(key, [out], job.notes[noted:], {},
                         {"float_layers": list(job.float_layers), "diagnosis": list(job.diagnosis),
                          "stability": job.stability})
    finally:
        for path in temp:
            path.unlink(missing_ok=True)
        for leftover in folder.glob("*-inferred.onnx"):  # quantize_static's scratch files
            leftover.unlink(missing_ok=True)
    return [out]


def l2_ranges(cache: Path) -> int:
    """Rewrite ONNX Runtime's calibration cache (entropy calibration: a histogram per tensor) with the range the
    quantize stage's histogram observer would pick on each histogram: the least expected squared error of
    rounding to the uint8 grid plus clipping (observers.Histogram.best_range). Returns the tensors rewritten."""
    import torch
    from onnxruntime.quantization.calibrate import load_tensors_data, save_tensors_data

    from compresspipe.runtimes.observers import Histogram

    data = load_tensors_data(cache)
    count = 0
    for name in list(data.keys()):
        td = data[name]
        hist, edges = getattr(td, "hist", None), getattr(td, "bins", getattr(td, "hist_edges", None))
        if hist is None or edges is None or len(edges) != len(hist) + 1 or float(np.sum(hist)) == 0.0:
            continue
        histogram = Histogram(bins=len(hist))
        histogram.lo, histogram.hi = float(edges[0]), float(edges[-1])
        histogram.counts = torch.as_tensor(np.asarray(hist, dtype=np.float64))
        lo, hi = histogram.best_range()
        dtype = np.asarray(td.lowest).dtype
        td.lowest, td.highest = np.asarray(min(lo, 0.0), dtype=dtype), np.asarray(max(hi, 0.0), dtype=dtype)
        count += 1
    save_tensors_data(data, cache)
    return count


def _int8_key(job: ExportJob, source: Path, opts: dict[str, Any]) -> str:
    """What decides model.int8.onnx: the float file's bytes, the int8 settings, the CPU target, the fidelity
    spec, the inputs' description and the calibration batches the quantizer reads. (The validation batches a
    stage verifies on are not part of it: a reused file was judged on the rows' own batches, and every stage
    verifies the file it ships on its own.)"""
    import hashlib

    def plain(value: Any) -> Any:
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    digest = hashlib.sha256(json.dumps({
        "source": sha256_file(source), "opts": opts, "cpu": job.cpu, "handoff": plain(job.handoff),
        "fidelity": plain(job.fidelity), "int8": plain(job.config.int8), "keep_names": job.config.keep_names,
        "io": plain(job.io),
    }, sort_keys=True, default=str).encode())
    for batch in job.calibration(opts["batch_size"], opts["calibration_batches"]):
        for tensor in (batch.values() if isinstance(batch, dict) else [batch]):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "int8:" + digest.hexdigest()


QUANTIZABLE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
DIAGNOSIS_BATCHES = 4  # calibration batches the per-layer comparison runs on
FLOAT_LAYERS_KEY = "compresspipe.float_layers"
# why a file that failed deploy.fidelity diverges (its worst layers, the float model's own stability), so that a
# later stage measuring the same file (the export stage's row) reports it too
DIAGNOSIS_KEY = "compresspipe.fidelity_diagnosis"


def _measure(job: ExportJob, path: Path) -> dict[str, Any]:
    """The file's fidelity (deploy.fidelity) on the job's validation batches, against its float source."""
    import torch

    from compresspipe.runtimes.job import compare, fidelity, per_sample
    from compresspipe.runtimes.onnx_float import feed_types, session

    sess = session(path, 1)
    names, dtypes = feed_types(sess)

    def run(x: Any) -> Any:
        return torch.from_numpy(sess.run(None, numpy_feed(x, names, dtypes))[0])

    metrics = compare(job, run if job.config.dynamic_batch else per_sample(run))
    return fidelity(metrics, job, int8=True)


def _fit_fidelity(job: ExportJob, prepared: Path, out: Path, excluded: list[str], quantize: Any,
                  graph_model: Any, calib: dict[str, Any], seven_bit: bool = False) -> None:
    """Fit the int8 file to deploy.fidelity (see _fit); when it still does not fit, say whether the float model
    itself holds its predictions under the rounding of its input that int8 brings, and, for a file with 7-bit
    weights (deploy.cpu portable), what the same file with 8-bit weights would reach."""
    if _fit(job, prepared, out, excluded, quantize, graph_model, calib) is False:
        try:
            _stability_note(job, prepared, out, graph_model)
        except Exception as exc:  # best effort: the gate has judged the file already
            logging.getLogger(__name__).debug("stability check failed: %s", exc)
        if seven_bit:
            try:
                _eight_bit_note(job, out, excluded, quantize)
            except Exception as exc:  # best effort, as above
                logging.getLogger(__name__).debug("8-bit comparison failed: %s", exc)


def _eight_bit_note(job: ExportJob, out: Path, excluded: list[str], quantize: Any) -> None:
    """7-bit weights halve each weight's grid: on mobile networks (depthwise convolutions, few weights per output)
    that alone can cost the gate. Measure the same file, every layer int8, with 8-bit weights, and say what it
    reaches and on which CPUs such a file is correct; the 7-bit file in `out` is kept as it was."""
    import shutil

    backup = out.with_name(".model.7bit.onnx")
    shutil.copyfile(out, backup)
    try:
        quantize(excluded, seven_bit=False)
        result = _measure(job, out)
    finally:
        shutil.move(backup, out)
    verdict = "passes deploy.fidelity" if result["passed"] else "does not pass deploy.fidelity either"
    job.notes.append(f"model.int8.onnx: with 8-bit weights instead of deploy.cpu {job.cpu}'s 7, every layer int8, "
                     f"the file agrees with its float model at {result['agreement']:.4f} and {verdict}; such a file "
                     "is correct on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX) and on ARM: set deploy.cpu to "
                     "x86-vnni, arm64 or auto (on such a CPU) when the file ships to those")


def _fit(job: ExportJob, prepared: Path, out: Path, excluded: list[str], quantize: Any,
         graph_model: Any, calib: dict[str, Any]) -> bool | None:
    """When the int8 file does not follow its float source within deploy.fidelity: first a calibration that clips
    outliers (min/max ranges are blown by a few large activations in mobile networks' hard-swish and
    squeeze-excitation layers: percentile 99.99, then 99.9), then automatic mixed precision: the layers where the
    int8 graph diverges most from the float one stay float, 1, 2, 4, ... at a time, up to half the quantized nodes.
    The divergence is ONNX Runtime's own QDQ debugging (`qdq_loss_debug`: every intermediate tensor of both graphs
    on calibration batches); what changed, or why the file still fails, reaches the report (job.notes,
    job.float_layers, job.diagnosis)."""
    if job.fidelity is None:
        return None
    first = _measure(job, out)
    if first["passed"]:
        return True
    if calib["method"] == "minmax" and job.fidelity.mixed_precision:
        tried = [f"minmax {first['agreement']:.4f}"]
        best_calib, best_agreement = dict(calib), first["agreement"]
        for pct in (99.99, 99.9):
            calib.update(method="percentile", extra={**calib["extra"], "CalibPercentile": pct})
            quantize(excluded)
            result = _measure(job, out)
            tried.append(f"percentile {pct} {result['agreement']:.4f}")
            if result["passed"]:
                job.notes.append(f"model.int8.onnx: min/max calibration did not follow the float model within "
                                 f"deploy.fidelity; calibrated with percentile {pct} instead (agreement: "
                                 f"{', '.join(tried)})")
                return True
            if result["agreement"] > best_agreement:
                best_calib, best_agreement = dict(calib), result["agreement"]
        calib.clear()
        calib.update(best_calib)
        job.notes.append(f"model.int8.onnx: no calibration follows the float model by itself (agreement: "
                         f"{', '.join(tried)}); {calib['method']} kept")
        quantize(excluded)
        first = _measure(job, out)
    try:
        ranked = _diverging(job, prepared, out, graph_model)
    except Exception as exc:  # debugging is best effort: the gate still judges the file
        job.notes.append(f"model.int8.onnx: could not compare its layers with the float graph ({type(exc).__name__})")
        return False
    job.diagnosis = [{k: r[k] for k in ("layer", "op", "sqnr_db", "lost_db", "cause")} for r in ranked[:5]]
    # any node may stay float: an elementwise op (a Mul, a HardSigmoid) often loses more than a convolution
    candidates = sorted((r for r in ranked if r["node"] and r["node"] not in excluded), key=lambda r: r["sqnr_db"])
    quantized = len(ranked)  # nodes whose int8 output could be compared: what the runtime quantized
    limit = max(1, quantized // 2)
    if not job.fidelity.mixed_precision or not candidates:
        return False
    # which nodes stay float: those whose int8 alone moves the logits most (NNCF's and AIMET's per-layer
    # sensitivity). The signal-to-noise along the all-int8 graph is lowest at its last layers, where the error of
    # the early ones arrives: on MobileNetV2 the first convolutions matter most, and keeping the last ones float
    # fitted nothing
    try:
        impact = _impact(job, prepared, out, graph_model, [r["node"] for r in candidates], quantize, excluded)
        candidates.sort(key=lambda r: -impact[r["node"]])
    except Exception as exc:  # ranking is best effort: the lowest signal-to-noise first then
        job.notes.append(f"model.int8.onnx: could not rank layers by their effect on the output "
                         f"({type(exc).__name__}); ranked by signal-to-noise")
    # a node's int8 error comes in through the grid of its inputs: data-movement and elementwise ops before it
    # (a Concat, a Slice, a Mul) share that grid, so they stay float with it
    producer = {o: n for n in graph_model.graph.node for o in n.output}

    def group(name: str) -> list[str]:
        """The node, the non-compute ops before it, and the compute op that feeds them (a Gemm whose fused Relu
        shows the error)."""
        node = next(n for n in graph_model.graph.node if n.name == name)
        out, todo = [name], [(i, 0) for i in node.input]
        while todo:
            tensor, depth = todo.pop()
            up = producer.get(tensor)
            if up is None or depth >= 4 or not up.name or up.name in out:
                continue
            out.append(up.name)
            if up.op_type not in QUANTIZABLE_OPS:
                todo += [(i, depth + 1) for i in up.input]
        return out

    def nodes_of(count: int) -> list[str]:
        return list(dict.fromkeys(n for r in candidates[:count] for n in group(r["node"])))

    # every try is kept in mind: float layers do not add up (two layers that each help alone can hurt together),
    # so the file that ships is the try that follows best (fewest float layers among equals), not the last one
    tries: list[tuple[dict[str, Any], list[str]]] = [(first, [])]

    def attempt(nodes: list[str]) -> dict[str, Any]:
        quantize(excluded + nodes)
        result = _measure(job, out)
        tries.append((result, nodes))
        return result

    k, prev = 1, 0
    while True:
        kept_nodes = nodes_of(k)
        if k > 1 and len(kept_nodes) > limit:  # no more than half the graph float: then the file fails
            # the most candidates between the last try (prev) and k that fit the limit
            j = k - 1
            while j > prev and len(nodes_of(j)) > limit:
                j -= 1
            if j > prev:
                attempt(nodes_of(j))
            break
        result = attempt(kept_nodes)
        if result["passed"] or k >= min(limit, len(candidates)):
            break
        prev, k = k, min(2 * k, limit, len(candidates))
    best, kept_nodes = max(tries, key=lambda t: (bool(t[0]["passed"]), t[0]["agreement"] or 0.0, -len(t[1])))
    if kept_nodes != tries[-1][1]:  # `out` holds the last try: write the best one again
        quantize(excluded + kept_nodes)
    job.float_layers = list(dict.fromkeys(n.rsplit("/", 1)[0] if "/" in n else n for n in kept_nodes))
    set_metadata(out, {FLOAT_LAYERS_KEY: ",".join(job.float_layers)})
    verdict = "fits" if best["passed"] else "still does not fit"
    steps = ", ".join(f"{len(nodes)} float {result['agreement']:.4f}" for result, nodes in tries)
    if kept_nodes:
        job.notes.append(f"model.int8.onnx: {len(kept_nodes)} of {quantized} quantized node(s) kept float (automatic "
                         f"mixed precision, deploy.fidelity): {', '.join(job.float_layers)}; agreement with the float "
                         f"model {first['agreement']:.4f} -> {best['agreement']:.4f}, which {verdict} (tried: {steps})")
    else:
        job.notes.append(f"model.int8.onnx: automatic mixed precision found no float layers that make the file follow "
                         f"its float model better (tried: {steps}); every layer stays int8")
    if best["passed"]:
        job.diagnosis = []
    return bool(best["passed"])


IMPACT_SAMPLES = 128  # calibration samples each node's sensitivity is measured on


def _samples(job: ExportJob, graph_model: Any) -> list[dict[str, np.ndarray]]:
    """IMPACT_SAMPLES calibration samples as feeds of the graph (batches of 32, or 1 when the batch is fixed)."""
    names = [i.name for i in graph_model.graph.input]
    batch = 32 if job.config.dynamic_batch else 1
    return list(_Calibration._items(job, names, batch, max(1, IMPACT_SAMPLES // batch)))[:IMPACT_SAMPLES]


def _validation_feeds(job: ExportJob, graph_model: Any) -> list[dict[str, np.ndarray]]:
    """The validation inputs the fidelity gate judges, as feeds of the graph (one sample per feed when its batch
    is fixed)."""
    names = [i.name for i in graph_model.graph.input]
    feeds: list[dict[str, np.ndarray]] = []
    for x, _labels in job.batches:
        feed = numpy_feed(x, names)
        if job.config.dynamic_batch:
            feeds.append(feed)
        else:
            feeds += [{k: v[i : i + 1] for k, v in feed.items()} for i in range(batch_len(x))]
    return feeds


def _input_steps(out: Path, graph_model: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """The int8 grid step of each float graph input: the scale of the QuantizeLinear the file puts on it, else
    1/255 of the input's range on these samples (what an 8-bit input would round to)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    steps: dict[str, float] = {}
    for inp in graph_model.graph.input:
        values = [f[inp.name] for f in feeds if inp.name in f]
        if not values or not np.issubdtype(values[0].dtype, np.floating):
            continue
        q = next((n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == inp.name), None)
        if q is not None and q.input[1] in inits:
            steps[inp.name] = float(np.max(numpy_helper.to_array(inits[q.input[1]])))
        else:
            lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
            steps[inp.name] = (hi - lo) / 255 or 1.0 / 255
    return steps


STABILITY_DRAWS = 3  # random weight perturbations the float model is measured under (their mean is reported)


def _stability_note(job: ExportJob, prepared: Path, out: Path, graph_model: Any) -> None:
    """Whether the float model itself holds its top-1 under perturbations of the size int8 brings: each input
    value moved by at most half a step of the file's input grid, and each quantized weight moved by at most half
    its own int8 step (uniform noise, the scales the file uses; what rounding to nearest does, in a random
    direction). Held below 1 - min_agreement, no int8 file can follow the model: the note and the gate say so
    (job.stability), and that the cure is in the model (longer training, weight decay, label smoothing), not in
    the quantizer. A mobile network trained briefly can sit there: many validation samples within a logit of a
    tie while its logits reach the hundreds. Measured on the validation samples the gate judges: on training
    samples a model is surer of itself (a zoo MNASNet held 0.992 of them under weight noise, 0.965 of these)."""
    import onnx
    from onnx import numpy_helper

    from compresspipe.runtimes.onnx_float import session

    assert job.fidelity is not None  # noqa: S101 - only called when the gate is on
    feeds = _validation_feeds(job, graph_model)
    steps = _input_steps(out, graph_model, feeds)
    rng = np.random.default_rng(0)
    sess = session(prepared, 1)
    reference = [np.asarray(sess.run(None, f)[0]) for f in feeds]
    if not reference or reference[0].ndim != 2 or reference[0].shape[1] < 2:
        return  # top-1 of (samples, classes) outputs: a per-pixel or per-token output has its own class axis

    def held(run: Any, noisy_input: bool) -> tuple[float, int]:
        same = total = 0
        for f, a in zip(feeds, reference, strict=True):
            x = {k: (v + rng.uniform(-steps[k] / 2, steps[k] / 2, v.shape)).astype(v.dtype) if k in steps else v
                 for k, v in f.items()} if noisy_input else f
            b = np.asarray(run(x))
            top2 = np.sort(a, axis=1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) >= job.fidelity.tie_margin  # ties are left out, as the gate does
            same += int((a.argmax(1) == b.argmax(1))[clear].sum())
            total += int(clear.sum())
        return same / max(total, 1), total

    found: dict[str, Any] = {}
    if steps:
        found["input"], total = held(lambda x: sess.run(None, x)[0], True)
    grids = _weight_steps(out, graph_model)
    if grids:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 1, 3
        base = onnx.load(str(prepared))
        values = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer if t.name in grids}
        draws = []
        for _ in range(STABILITY_DRAWS):
            for t in base.graph.initializer:
                if t.name in values:
                    w = values[t.name]
                    noise = rng.uniform(-0.5, 0.5, w.shape) * grids[t.name]
                    t.CopyFrom(numpy_helper.from_array((w + noise).astype(w.dtype), t.name))
            noisy = ort.InferenceSession(base.SerializeToString(), options, providers=["CPUExecutionProvider"])
            kept, total = held(lambda x, s=noisy: s.run(None, x)[0], False)
            draws.append(kept)
        found["weights"] = float(np.mean(draws))
    if not found:
        return
    job.stability = {**{k: round(float(v), 4) for k, v in found.items()}, "samples": total,
                     "min_agreement": job.fidelity.min_agreement}
    low = {k: v for k, v in found.items() if v < job.fidelity.min_agreement}
    if total and low:
        what = {"input": "its input moves by half an int8 step",
                "weights": f"each quantized weight moves randomly within half its int8 step (the size of int8 "
                           f"rounding; mean of {STABILITY_DRAWS} draws)"}
        job.notes.append(
            "model.int8.onnx: the float model itself keeps only "
            + " and ".join(f"{v:.4f} of its top-1 predictions when {what[k]}" for k, v in low.items())
            + f" (uniform noise, {total} validation samples that are not ties), below deploy.fidelity's "
            f"min_agreement {job.fidelity.min_agreement}: no int8 file on this grid can follow it; make the model less "
            f"sensitive "
            f"(train longer, weight decay, label smoothing) or ship the float file")


def _weight_steps(out: Path, graph_model: Any) -> dict[str, np.ndarray]:
    """For each float weight of `graph_model` that the int8 file `out` quantizes: its int8 grid step, shaped to
    broadcast over the weight (per channel along the DequantizeLinear's axis, or one step per tensor)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    float_nodes = {n.name: n for n in graph_model.graph.node if n.name}
    float_inits = {t.name: t for t in graph_model.graph.initializer}
    steps: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2 or node.name not in float_nodes:
            continue
        dq = producer.get(node.input[1])
        source = float_nodes[node.name]
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits or len(source.input) < 2 \
                or source.input[1] not in float_inits:
            continue
        dims = list(float_inits[source.input[1]].dims)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        if scale.size > 1:
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % max(1, len(dims))
            if axis >= len(dims) or dims[axis] != scale.size:
                continue
            shape = [1] * len(dims)
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        steps[source.input[1]] = scale
    return steps


def _impact(job: ExportJob, prepared: Path, out: Path, graph_model: Any, nodes: list[str], quantize: Any,
            excluded: list[str]) -> dict[str, float]:
    """Each node's sensitivity: the logits' squared error, relative to their energy, when it alone is int8 (every
    other node float), on calibration samples (not the validation split the gate judges). The calibrated ranges
    are computed once (ONNX Runtime's calibration cache), so each node costs one graph rewrite and one run."""
    from compresspipe.runtimes.onnx_float import session
    from compresspipe.ui import UI

    feeds = _samples(job, graph_model)

    def logits(path: Path) -> np.ndarray:
        sess = session(path, 1)
        return np.concatenate([np.asarray(sess.run(None, f)[0], dtype=np.float64).reshape(len(next(iter(
            f.values()))), -1) for f in feeds])

    ref = logits(prepared)
    energy = float(np.mean(ref ** 2)) or 1.0
    impact: dict[str, float] = {}
    ui = job.ui or UI(quiet=True)
    with ui.progress(f"{job.stage}: ranking {len(nodes)} int8 layers by their effect on the output",
                     len(nodes)) as bar:
        for node in nodes:
            quantize(excluded, only=[node])
            impact[node] = float(np.mean((logits(out) - ref) ** 2)) / energy
            bar.advance(1)
    return impact


def _diverging(job: ExportJob, prepared: Path, out: Path, graph_model: Any) -> list[dict[str, Any]]:
    """The float graph's nodes ranked by how much int8 error each adds (SQNR at its inputs minus at its output, float
    vs int8 graph), with the likely cause of each."""
    import tempfile

    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from compresspipe.runtimes.cpu import VNNI_FLAGS, host_isa

    names = [i.name for i in graph_model.graph.input]
    batches = [numpy_feed(x, names) for x in job.calibration(8, DIAGNOSIS_BATCHES)]

    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> Any:
            return next(self.items, None)

    with tempfile.TemporaryDirectory(prefix=".qdq-debug-", dir=out.parent) as scratch:
        f_aug, q_aug = Path(scratch) / "float.onnx", Path(scratch) / "int8.onnx"
        modify_model_output_intermediate_tensors(str(prepared), str(f_aug))
        modify_model_output_intermediate_tensors(str(out), str(q_aug))
        f_act = collect_activations(str(f_aug), Reader(), execution_providers=["CPUExecutionProvider"])
        q_act = collect_activations(str(q_aug), Reader(), execution_providers=["CPUExecutionProvider"])
    errors = compute_activation_error(create_activation_matching(q_act, f_act))
    sqnr = {name: float(e["xmodel_err"]) for name, e in errors.items() if "xmodel_err" in e}
    consumers: dict[str, list[Any]] = {}
    for node in graph_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    saturates = job.cpu in ("x86-vnni", "arm64") and not any(f in host_isa() for f in VNNI_FLAGS)
    producer = {o: node for node in graph_model.graph.node for o in node.output}
    exact = 100.0  # graph inputs and weights: no int8 error yet
    upstream: dict[str, float] = {}

    def before(tensor: str, depth: int = 0) -> float:
        """SQNR of the nearest compared tensor upstream (a fused Conv->Relu has none in between)."""
        if tensor in sqnr:
            return sqnr[tensor]
        if tensor not in producer or depth > 50:
            return exact
        if tensor not in upstream:
            ins = [before(i, depth + 1) for i in producer[tensor].input if i]
            upstream[tensor] = min(ins) if ins else exact
        return upstream[tensor]

    rows = []
    for node in graph_model.graph.node:
        outs = [sqnr[o] for o in node.output if o in sqnr]
        if not outs:
            continue
        after = min(outs)
        ins = [before(i) for i in node.input if i]
        before_db = min(ins) if ins else exact
        out_name = next(o for o in node.output if o in sqnr)
        rows.append({"node": node.name, "layer": node.name.rsplit("/", 1)[0] if "/" in node.name else node.name,
                     "op": node.op_type, "sqnr_db": round(after, 2), "lost_db": round(before_db - after, 2),
                     "cause": _cause(node, out_name, f_act, consumers, saturates, after)})
    rows.sort(key=lambda r: -r["lost_db"])
    return rows


def _cause(node: Any, out_name: str, f_act: dict[str, list[np.ndarray]], consumers: dict[str, list[Any]],
           saturates: bool, sqnr: float) -> str:
    """The likely reason one node's int8 output strays from the float one."""
    if any(c.op_type == "BatchNormalization" for c in consumers.get(out_name, [])):
        return "an unfolded BatchNorm follows it (its int8 output is rescaled in float)"
    values = np.abs(np.concatenate([a.reshape(-1) for a in f_act.get(out_name, [])] or [np.zeros(1)]))
    if values.size > 100:
        top, p999 = float(values.max()), float(np.percentile(values, 99.9))
        if p999 > 0 and top / p999 > 4:
            return (f"its activation range is blown by outliers (max {top:.3g}, 99.9th percentile {p999:.3g}): "
                    "observer: percentile clips them")
    if node.op_type not in QUANTIZABLE_OPS:
        return f"{node.op_type} runs on 8-bit inputs and outputs in the runtime (an operator int8 handles coarsely)"
    if saturates:
        return "8-bit weights: this CPU's int8 kernels saturate (no VNNI); deploy.cpu: portable avoids it"
    return f"int8 rounding noise ({sqnr:.1f} dB signal-to-noise after it)"


def float_layers_of(path: Path) -> list[str]:
    """The layers an int8 file kept float (automatic mixed precision), from its metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    value = next((p.value for p in model.metadata_props if p.key == FLOAT_LAYERS_KEY), "")
    return [v for v in value.split(",") if v]


def diagnosis_of(path: Path) -> dict[str, Any]:
    """What an int8 file that failed deploy.fidelity recorded about why (`diverging`, `stability`); {} if nothing."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    value = next((p.value for p in model.metadata_props if p.key == DIAGNOSIS_KEY), "")
    try:
        found = json.loads(value) if value else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def weight_abs_max(path: Path) -> int | None:
    """The widest |value| among an ONNX file's int8 initializers (its int8 weights); None if it has none.

    With |w| <= 64 no pair of uint8 x int8 products can saturate ONNX Runtime's int16 sums on AVX2 CPUs.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    widest: int | None = None
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(init).astype(np.int16)
            if values.size:
                widest = max(widest or 0, int(np.abs(values).max()))
    return widest


def layer_nodes(module: Any, model: Any, names: list[str], input_shape: tuple[int, ...],
                ) -> tuple[list[str], list[str]]:
    """(ONNX node names of the torch layers `names`, the names not found).

    The exporter's names are gone by now (the graph is compacted and pre-processed), so layers and nodes are paired
    by order: torch's Conv2d/Linear layers in the order a forward pass calls them, the graph's Conv/Gemm/MatMul
    nodes with a constant weight in graph order, and each pair must agree on the weight's shape (BatchNorm folding
    keeps it; MatMul holds it transposed). Any disagreement maps nothing rather than the wrong layer."""
    import torch
    from torch import nn

    by_scope: dict[str, list[str]] = {}
    for node in model.graph.node:  # nodes named after their PyTorch module (onnx_float.compact_names)
        if node.op_type in ("Conv", "Gemm", "MatMul") and "/" in node.name:
            by_scope.setdefault(node.name.rsplit("/", 1)[0], []).append(node.name)
    if by_scope:
        return ([n for name in names for n in by_scope.get(name, [])], [name for name in names if name not in by_scope])
    order: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            def record(_m: Any, _i: Any, _o: Any, name: str = name, layer: Any = layer) -> None:
                if name not in {n for n, _ in order}:
                    order.append((name, tuple(layer.weight.shape)))
            hooks.append(layer.register_forward_hook(record))
    try:
        with torch.no_grad():
            module(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
             and (n.input[1] in weights or n.input[0] in weights)]
    if len(nodes) != len(order):
        return [], list(names)
    found: dict[str, str] = {}
    for (name, shape), node in zip(order, nodes, strict=True):
        dims = weights.get(node.input[1]) or weights.get(node.input[0])
        if dims is None or (tuple(dims) != shape and tuple(reversed(dims)) != shape):
            return [], list(names)
        found[name] = node.name
    return [found[n] for n in names if n in found], [n for n in names if n not in found]


def small_convs(model: Any) -> list[str]:
    """Names of ungrouped Conv nodes whose constant weight sums over fewer than SMALL_CONV_REDUCTION inputs."""
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or not node.name or len(node.input) < 2 or node.input[1] not in weights:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = weights[node.input[1]]
        if group == 1 and len(dims) >= 3 and int(np.prod(dims[1:])) < SMALL_CONV_REDUCTION:
            names.append(node.name)
    return names


def float_outputs(path: Path) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pair in front of each graph output.

    The producing node then returns float directly; ONNX Runtime still fuses it with its int8 inputs (QGemm
    with a float output). Returns how many outputs changed.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    changed = 0
    for output in graph.output:
        dq = producer.get(output.name)
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or users.get(q.output[0], 0) != 1:
            continue
        if q.input[0] not in producer or q.input[0] in {o.name for o in graph.output}:
            continue
        source = q.input[0]
        graph.node.remove(dq)
        graph.node.remove(q)
        for node in graph.node:  # the float tensor takes the output's name everywhere it is read or written
            node.input[:] = [output.name if n == source else n for n in node.input]
            node.output[:] = [output.name if n == source else n for n in node.output]
        changed += 1
    if changed:
        # the removed pair's scale and zero point are read by nothing now: ONNX Runtime would warn at every load
        read = {name for node in graph.node for name in node.input}
        unused = [t for t in graph.initializer if t.name not in read and t.name not in {o.name for o in graph.output}]
        for tensor in unused:
            graph.initializer.remove(tensor)
        onnx.save(model, str(path))
    return changed


def _preprocess(source: Path, target: Path, job: ExportJob) -> Path:
    """Shape inference and graph cleanup ONNX Runtime recommends before quantizing; the source if it fails.

    It runs in a scratch folder beside `target`: when symbolic shape inference is incomplete (a BERT's dynamic
    sequence), ONNX Runtime saves `sym_shape_infer_temp.onnx` and its external data into the working directory,
    which would leave files in the user's folder."""
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = source.resolve(), target.resolve()
    try:
        with tempfile.TemporaryDirectory(prefix=".ort-pre-", dir=target.parent) as scratch, contextlib.chdir(scratch):
            quant_pre_process(str(source), str(target))
        name_nodes(target)
        folded = fold_bn_through_concat(target)
        if folded:
            job.notes.append(f"model.int8.onnx: {folded} BatchNorm(s) after a channel concat of convolutions (a mixed "
                             "or split convolution, as in MixNet) folded into those convolutions; ONNX Runtime folds "
                             "only a BatchNorm that directly follows one convolution")
        return target
    except Exception as exc:  # optional step: quantization still works without it
        job.notes.append(f"model.int8.onnx: ONNX Runtime pre-processing skipped ({type(exc).__name__})")
        return source


def fold_bn_through_concat(path: Path) -> int:
    """Fold each inference BatchNormalization whose input is a Concat along channels of Conv outputs (each read by
    that Concat alone) into those convolutions: each conv's weights and bias take the scale and shift of its slice
    of channels, and the Concat then writes the BatchNorm's output. Unfolded, the int8 file runs the BatchNorm on
    8-bit inputs and outputs. Returns how many were folded; rewrites `path` when any."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1

    def attr(node: Any, name: str, default: Any) -> Any:
        return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    drop: list[Any] = []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or int(attr(bn, "training_mode", 0)):
            continue
        cat = producer.get(bn.input[0])
        if cat is None or cat.op_type != "Concat" or attr(cat, "axis", None) != 1 or readers.get(cat.output[0]) != 1 \
                or not all(i in inits for i in bn.input[1:5]):
            continue
        convs = [producer.get(i) for i in cat.input]
        if not all(c is not None and c.op_type == "Conv" and readers.get(c.output[0]) == 1 and c.input[1] in inits
                   and readers.get(c.input[1]) == 1 and (len(c.input) < 3 or not c.input[2]
                                                         or (c.input[2] in inits and readers.get(c.input[2]) == 1))
                   for c in convs):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        shift = beta - mean * scale
        widths = [numpy_helper.to_array(inits[c.input[1]]).shape[0] for c in convs if c is not None]
        if sum(widths) != scale.size:
            continue
        start = 0
        for conv, width in zip(convs, widths, strict=True):
            assert conv is not None  # noqa: S101 - checked above
            w = numpy_helper.to_array(inits[conv.input[1]])
            part = slice(start, start + width)
            start += width
            has_bias = len(conv.input) > 2 and bool(conv.input[2])
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(width)
            new_w = (w.astype(np.float64) * scale[part].reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            inits[conv.input[1]].CopyFrom(numpy_helper.from_array(new_w, conv.input[1]))
            new_b = (b * scale[part] + shift[part]).astype(w.dtype)
            if has_bias:
                inits[conv.input[2]].CopyFrom(numpy_helper.from_array(new_b, conv.input[2]))
            else:
                bias_name = f"{conv.input[1]}_folded_bias"
                graph.initializer.append(numpy_helper.from_array(new_b, bias_name))
                while len(conv.input) < 3:
                    conv.input.append("")
                conv.input[2] = bias_name
        cat.output[0] = bn.output[0]
        drop.append(bn)
    if not drop:
        return 0
    for node in drop:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    gone = {i for node in drop for i in node.input[1:5]} - used  # the folded BatchNorms' own parameters
    for t in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(t)
    onnx.save(model, str(path))
    return len(drop)


def name_nodes(path: Path) -> int:
    """Name the nodes pre-processing added without a name (a HardSwish decomposed into HardSigmoid and Mul) after
    the module of the node that feeds them, so they can stay float and be named in reports. Returns how many."""
    import onnx

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    used = {n.name for n in model.graph.node if n.name}
    named = 0
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        source = next((producer[t].name for t in node.input if t in producer and producer[t].name), "")
        base = f"{source.rsplit('/', 1)[0]}/{node.op_type}" if "/" in source else f"n{i}_{node.op_type}"
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        used.add(name)
        named += 1
    if named:
        onnx.save(model, str(path))
    return named


EXPORTERS = {
    "onnx_int8": Exporter(
        "onnx_int8", "model.int8.onnx", available, export, verify_onnx, int8=True,
        load_snippet=("import onnxruntime as ort; sess = ort.InferenceSession('model.int8.onnx')",
                      "logits = sess.run(None, {'input': x.astype('float32')})[0]"),
    ),
}
