"""The quantize stage: select layers, fold BatchNorm, calibrate, swap in tensor-only quantized layers.

The int8/int4 layers are a float emulation in PyTorch (see `.layers`); details["emulated"] says so.

The model is traced with torch.fx only to find conv->BatchNorm pairs to fold and ReLU/ReLU6 to fuse;
a model that does not trace is still quantized, just without folding and fusion (a note says so).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from compresspipe.artifacts.edits import set_submodule
from compresspipe.errors import StageConfigError
from compresspipe.metrics.tasks import TASKS
from compresspipe.models.inputs import float_to, forward
from compresspipe.runtimes.handoff import ALGORITHM_LABELS
from compresspipe.runtimes.observers import RangeObserver
from compresspipe.stages.base import Need, Score, Stage, StagePlan, StageResult
from compresspipe.stages.graph import analyse, fold_bn, fold_target
from compresspipe.stages.quantize import (
    HEAD_FLOAT_SHARE,
    OnnxInt4Handoff,
    OnnxInt8Handoff,
    QuantizeConfig,
    QuantizeRecord,
)
from compresspipe.stages.quantize.backends import QuantBackend, resolve
from compresspipe.stages.quantize.layers import (
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    act_qparams,
    cast_layer,
    quantize_edit,
)
from compresspipe.stages.quantize.nbits import QuantMatMulNBits, is_conv1d
from compresspipe.stages.select import breaks_model, select_layers

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.context import StageContext

CANDIDATES: dict[str, tuple[type, ...]] = {
    "dynamic": (nn.Linear,),
    "static": (nn.Conv2d, nn.Linear),
    "qat": (nn.Conv2d, nn.Linear),
    "weight_only": (nn.Conv2d, nn.Linear),
    "fp16": (nn.Conv2d, nn.Linear),
    "bf16": (nn.Conv2d, nn.Linear),
}
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EMULATION_NOTE = ("emulated int8: the PyTorch model is a float emulation of the int8 file, computing exactly its "
                  "rounding ({activations} uint8 activations, int8 weights times their scales) with float32 ops, so "
                  "it is not faster than float32 in PyTorch; the int8 speed comes from the deploy runtime: export "
                  "format onnx_int8 (or executorch_int8)")
# -- calibration -------------------------------------------------------------------------------------


def calibrate(model: nn.Module, layers: dict[str, nn.Module], acts: dict[str, Callable], batches: list[Any],
              observer: str, percentile: float, bar: Any = None) -> dict[str, tuple[tuple[float, int], tuple[float, int]]]:
    """Input and output (after a fused activation) quantization parameters of each layer."""
    observers = {n: (RangeObserver(observer, percentile), RangeObserver(observer, percentile)) for n in layers}
    hooks = []
    for name, layer in layers.items():
        act = acts.get(name)

        def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name, act: Any = act) -> None:
            observers[name][0].update(inputs[0])
            observers[name][1].update(act(output) if act is not None else output)

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x in batches:
                forward(model, x)
                if bar is not None:
                    bar.advance(1)
    finally:
        for h in hooks:
            h.remove()
    return {n: (i.qparams(), o.qparams()) for n, (i, o) in observers.items()}


# -- QAT: fake quantization with straight-through gradients -----------------------------------------


class _FakeQuant(nn.Module):
    """Wraps a float Conv2d/Linear: per-channel fake-quant weights, fake-quant input/output ranges (EMA)."""

    def __init__(self, layer: Any, act: Callable | None, inp: tuple[float, int], out: tuple[float, int],
                 per_channel: bool):
        super().__init__()
        self.layer, self.act, self.per_channel = layer, act, per_channel
        self.ranges = {"in": list(_range(*inp)), "out": list(_range(*out))}

    def _fq_act(self, t: torch.Tensor, key: str) -> torch.Tensor:
        if self.training:
            lo, hi = float(t.detach().min()), float(t.detach().max())
            r = self.ranges[key]
            r[0], r[1] = 0.99 * r[0] + 0.01 * min(lo, 0.0), 0.99 * r[1] + 0.01 * max(hi, 0.0)
        scale, zp = act_qparams(*self.ranges[key])
        return torch.fake_quantize_per_tensor_affine(t, scale, zp, 0, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(1) if self.per_channel else w.detach().abs().max().reshape(1)
        scale = (amax / 127).clamp(min=1e-12)
        if self.per_channel:
            wq = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                        -128, 127)
        else:
            wq = torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -128, 127)
        x = self._fq_act(x, "in")
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(x, wq, self.layer.bias)
        else:
            y = F.linear(x, wq, self.layer.bias)
        if self.act is not None:
            y = self.act(y)
        return self._fq_act(y, "out")

    def current(self) -> tuple[tuple[float, int], tuple[float, int]]:
        return act_qparams(*self.ranges["in"]), act_qparams(*self.ranges["out"])


def _range(scale: float, zero_point: int) -> tuple[float, float]:
    return -zero_point * scale, (127 - zero_point) * scale


# -- the stage ---------------------------------------------------------------------------------------


def _unsupported(layer: nn.Module, method: str) -> str | None:
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" and method not in ("fp16", "bf16"):
            return f"padding_mode {layer.padding_mode} (int8 convolutions pad with zeros)"
        if isinstance(layer.padding, str) and method not in ("fp16", "bf16"):
            return f"padding {layer.padding!r} (give explicit padding to quantize)"
        if type(layer) is not nn.Conv2d:
            return f"{type(layer).__name__} is a Conv2d subclass with its own forward"
    if isinstance(layer, nn.Linear) and type(layer) is not nn.Linear:
        return f"{type(layer).__name__} is a Linear subclass with its own forward"
    return None


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


class QuantizeStage(Stage[QuantizeConfig]):
    def needs(self) -> list[Need]:
        method = self.config.method
        out = [Need("calibration_data", why=f"method: {method}")] if method in ("static", "qat") else []
        return out + ([Need("train_data", why="method: qat")] if method == "qat" else [])

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        cfg = self.config
        chosen = select_layers(state.module, cfg.include, cfg.exclude, self._kinds(state.module), ctx.name)
        return StagePlan(layers={n: cfg.method for n in chosen},
                         notes=[f"{cfg.method} ({cfg.dtype if cfg.method not in CAST_DTYPES else cfg.method}) on "
                                f"{len(chosen)} layer(s); structure unchanged, weights lower precision"])

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        cfg, stage = self.config, ctx.name
        backend = resolve(stage, cfg.method, cfg.dtype, cfg.backend)
        model = state.module.to("cpu").eval()
        chosen = select_layers(model, cfg.include, cfg.exclude, self._kinds(model), stage)
        skipped = {n: why for n, m in chosen.items() if (why := _unsupported(m, cfg.method)) is not None}
        layers = {n: m for n, m in chosen.items() if n not in skipped}
        if not layers:
            raise StageConfigError(stage, "no quantizable layer left: " + "; ".join(f"{n}: {w}" for n, w in skipped.items()))
        notes: list[str] = []
        head = self._float_head(model, layers, notes) if (cfg.method, cfg.dtype) == ("weight_only", "int4") else {}
        skipped.update(head)
        layers = {n: m for n, m in layers.items() if n not in head}
        if not layers:
            raise StageConfigError(stage, "no layer left to hold in 4 bits but the language model head, which "
                                          "quantize.head keeps float: set head: int4")
        bytes_before, params = _bytes(model), _count_params(model)
        val = ctx.data.loader("val", ctx.recipe.data.eval_batch_size)
        previous = ctx.input_metrics.get("score")  # what the executor measured on the model given to us
        acc_before = float(previous) if isinstance(previous, float) else _accuracy(model, val, ctx.task)
        original_types = {n: type(m).__name__ for n, m in model.named_modules() if n}
        weights = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules() if n}
        if backend.export_only:
            return self._handoff(state, ctx, layers, notes, acc_before)

        float_layers: list[str] = []
        if cfg.keep_float is not None:
            float_layers, mixed_rows, mixed_notes = self._mixed_precision(state, ctx, layers, backend, acc_before)
            notes += mixed_notes
            layers = {n: m for n, m in layers.items() if n not in float_layers}
            if not layers:
                raise StageConfigError(stage, f"keep_float: the accuracy drop fits only with every layer float "
                                              f"(max_accuracy_drop {cfg.keep_float.max_accuracy_drop}); raise the limit")
        batches = self._calibration(ctx) if cfg.method in ("static", "qat") else []
        model, new, folds, acts = self._convert(model, layers, ctx, backend, batches, notes, state.spec, skipped)
        state.module = model.eval()
        state.record(quantize_edit(cfg.method, new, list(folds.items())))
        grouped = [n for n, m in new.items() if isinstance(m, QuantMatMulNBits)]
        state.put(self._export_record(ctx, cfg.method, list(new), float_layers, grouped, head))

        acc_after = _accuracy(model, val, ctx.task)
        bytes_after = _bytes(model)
        table = self._table(original_types, new, folds, skipped, acts, cfg, set(float_layers), weights)
        notes += _float_weight_note(table, weights, params)
        metric = TASKS[ctx.task].default_metric
        notes.append(f"bytes per parameter {bytes_before / max(params, 1):.2f} -> {bytes_after / max(params, 1):.2f}; "
                     + (f"accuracy {acc_before:.2%} -> {acc_after:.2%}" if metric == "top1" else
                        f"{metric} {acc_before:.4g} -> {acc_after:.4g}") + " on the validation split")
        if cfg.method in ("static", "qat"):
            notes.append(f"{len(new)} layer(s) int8 with calibrated activations; {len(folds)} BatchNorm folded, "
                         f"{len(acts)} activation(s) fused")
        emulated = cfg.method not in CAST_DTYPES
        if cfg.method in ("static", "qat", "dynamic"):
            notes.append(EMULATION_NOTE.format(activations="per-batch" if cfg.method == "dynamic" else "calibrated"))
        details: dict[str, Any] = {
            "method": cfg.method, "dtype": cfg.dtype if cfg.method not in CAST_DTYPES else cfg.method,
            "backend": backend.name, "observer": cfg.observer if cfg.method in ("static", "qat") else None,
            "per_channel": cfg.per_channel, "emulated": emulated,
            "bytes_per_param": {"before": round(bytes_before / max(params, 1), 3),
                                "after": round(bytes_after / max(params, 1), 3)},
            "accuracy": {"before": acc_before, "after": acc_after, "change": acc_after - acc_before},
            "quantized_layers": len(new), "float_layers": sum(1 for r in table if r["quantized"] == "no"),
            "tables": {"per layer": table},
        }
        if cfg.keep_float is not None:
            details["keep_float"] = {"max_accuracy_drop": cfg.keep_float.max_accuracy_drop, "layers": float_layers}
            details["tables"]["mixed precision"] = mixed_rows
        return StageResult(state=state, kind="quantized", notes=notes, details=details)

    # -- sensitivity and mixed precision ---------------------------------------------------------

    def sensitivity_settings(self, ratios: list[float] | None = None) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.method in CAST_DTYPES or cfg.backend == "onnxruntime":
            return None
        return {"kind": "int8 against float" if cfg.dtype == "int8" else f"{cfg.dtype} against float",
                "setting": "one layer quantized, the rest float",
                "method": "static" if cfg.method == "qat" else cfg.method, "dtype": cfg.dtype,
                "observer": cfg.observer, "percentile": cfg.percentile, "per_channel": cfg.per_channel,
                "fold_bn": cfg.fold_bn, "calibration_batches": cfg.calibration.batches}

    def _float_head(self, model: nn.Module, layers: dict[str, nn.Module], notes: list[str]) -> dict[str, str]:
        """{the language model head: why it stays float} when `head` keeps it float (weight_only int4), else {}."""
        cfg = self.config
        name = output_layer(model)
        if name is None or name not in layers:
            if cfg.head == "float":
                notes.append("head: float: the model has no language model head among the selected layers "
                             "(transformers' get_output_embeddings)")
            return {}
        if cfg.head == "int4":
            return {}
        size = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in layers.items()}
        share = size[name] / max(sum(size.values()), 1)
        if cfg.head == "float":
            return {name: "language model head, kept float (quantize.head: float)"}
        if share > HEAD_FLOAT_SHARE:
            notes.append(f"head: auto: the language model head ({name}) is {share:.0%} of the weights to hold in 4 "
                         f"bits, more than {HEAD_FLOAT_SHARE:.0%}: 4-bit like the rest (head: float keeps it float)")
            return {}
        return {name: f"language model head, kept float (quantize.head: auto: {share:.1%} of the 4-bit weights, at "
                      f"most {HEAD_FLOAT_SHARE:.0%}; it picks every next token; head: int4 holds it in 4 bits)"}

    def _kinds(self, model: nn.Module) -> tuple[type, ...]:
        """The layer types this method quantizes; weight-only and dynamic add transformers' Conv1D (GPT-2), found in
        the model itself so transformers is never imported for it."""
        kinds = CANDIDATES[self.config.method]
        if self.config.method in ("weight_only", "dynamic"):  # GPT-2's Linear layers, weight stored [in, out]
            kinds += tuple({type(m) for m in model.modules() if is_conv1d(m)})
        return kinds

    def _layers(self, model: nn.Module, stage: str) -> dict[str, nn.Module]:
        cfg = self.config
        chosen = select_layers(model, cfg.include, cfg.exclude, self._kinds(model), stage)
        return {n: m for n, m in chosen.items() if _unsupported(m, cfg.method) is None}

    def sensitivity_layers(self, state: ModelState, ctx: StageContext) -> dict[str, dict[str, Any]]:
        return {n: {"type": type(m).__name__, "params": sum(p.numel() for p in m.parameters())}
                for n, m in self._layers(state.module, ctx.name).items()}

    def sensitivity(self, state: ModelState, ctx: StageContext, layer: str, settings: dict[str, Any],
                    score: Score) -> list[dict[str, Any]]:
        model = self._only(state, [layer], ctx)
        acc, loss = score(model)
        return [{"setting": settings["dtype"], "accuracy": acc, "loss": loss}]

    def _only(self, state: ModelState, names: list[str], ctx: StageContext) -> nn.Module:
        """A copy of the model with just `names` quantized (qat is measured as static: no training here)."""
        cfg = self.config
        method = "static" if cfg.method == "qat" else cfg.method
        stage = self if method == cfg.method else QuantizeStage(cfg.model_copy(update={"method": method}))
        backend = resolve(ctx.name, method, cfg.dtype, cfg.backend)
        model = copy.deepcopy(state.module).to("cpu").eval()
        layers = {n: model.get_submodule(n) for n in names}
        batches = stage._calibration(ctx) if method == "static" else []
        model, _, _, _ = stage._convert(model, layers, ctx, backend, batches, [], state.spec, {})
        return model.eval()

    def _mixed_precision(self, state: ModelState, ctx: StageContext, layers: dict[str, nn.Module],
                         backend: QuantBackend, acc_before: float) -> tuple[list[str], list[dict[str, Any]], list[str]]:
        """Keep the most sensitive layers float, one more at a time, until the accuracy drop fits the limit.

        Layers are ranked by their one-layer sensitivity (PyTorch's emulation, cached); each candidate is judged on
        the deploy runtime's int8 file where there is one (onnxruntime: the file that ships), else on the emulation,
        over the whole validation split against the float model in the same runtime."""
        from compresspipe.sensitivity.measure import measure

        cfg = self.config
        limit = cfg.keep_float.max_accuracy_drop  # type: ignore[union-attr]
        settings = self.sensitivity_settings()
        result = measure(self, state, ctx, settings or {}, samples=10**9, layers=list(layers))
        drops = {r["layer"]: r["points"][0]["drop"] for r in result["layers"]}
        order = sorted(layers, key=lambda n: (-(drops.get(n) or 0.0), list(layers).index(n)))
        judge = _FileJudge(state, ctx, self) if _FileJudge.usable(ctx) else None
        reference = judge.reference() if judge is not None else acc_before
        rows: list[dict[str, Any]] = []
        kept: list[str] = []
        for k in range(len(order) + 1):
            kept = order[:k]
            quantized = [n for n in layers if n not in kept]
            if not quantized:
                break
            if judge is not None:
                acc = judge.accuracy(quantized, kept)
            else:
                acc = _accuracy(self._only(state, quantized, ctx),
                                ctx.data.loader("val", ctx.recipe.data.eval_batch_size), ctx.task)
            drop = reference - acc
            rows.append({"float layers": ", ".join(kept) or "(none)", "int8 layers": len(quantized),
                         "accuracy": acc, "drop": drop, "fits": "yes" if drop <= limit + 1e-12 else "no"})
            if drop <= limit + 1e-12:
                break
        where = judge.describe() if judge is not None else "PyTorch's int8 emulation"
        notes = [f"keep_float: {len(kept)} of {len(layers)} layer(s) float ({', '.join(kept) or 'none'}) to keep the "
                 f"accuracy drop within {limit} ({where}, whole validation split); layers ranked by their one-layer "
                 f"sensitivity on {result['samples']} samples"]
        return kept, rows, notes

    # -- pieces ----------------------------------------------------------------------------------

    def _convert(self, model: nn.Module, layers: dict[str, nn.Module], ctx: StageContext, backend: QuantBackend,
                 batches: list[Any], notes: list[str], spec: Any, skipped: dict[str, str],
                 ) -> tuple[nn.Module, dict[str, nn.Module], dict[str, str], dict[str, Callable]]:
        """Fold BatchNorm into the selected convolutions, calibrate (and train, for qat), and swap in the quantized
        layers, except those the model's own code needs as they are (added to `skipped`); returns (model, new layers
        by name, conv -> folded BatchNorm, fused activations)."""
        cfg = self.config
        wants_fold = cfg.fold_bn and cfg.method != "dynamic"
        folds, acts, trace_error = analyse(model, wants_fold)
        if trace_error:
            notes.append(f"torch.fx could not trace the model ({trace_error}): BatchNorm not folded, ReLU not fused")
        folds = {c: b for c, b in folds.items() if c in layers}
        if cfg.method not in ("static", "qat", "dynamic"):
            acts = {}
        acts = {n: a for n, a in acts.items() if n in layers}
        for conv, bn in folds.items():
            module = model.get_submodule(bn)
            fold_bn(layers[conv], module)
            model = set_submodule(model, bn, fold_target(module))

        new: dict[str, nn.Module] = {}
        if cfg.method in CAST_DTYPES:
            new = {n: cast_layer(m, CAST_DTYPES[cfg.method]) for n, m in layers.items()}
            notes.append(f"{cfg.method} halves the file; BatchNorm is folded first and the other layers stay float32. "
                         + ("fp16 on CPU is usually much slower than float32 (its matmuls are emulated; 14x slower "
                            "in benchmarks/bench_quantize.py)" if cfg.method == "fp16" else
                            "bf16 is faster than float32 only on CPUs with AVX512-BF16 or AMX, slower elsewhere"))
        elif cfg.method in ("dynamic", "weight_only"):
            bits = 4 if cfg.dtype == "int4" else 8
            new = {n: QuantMatMulNBits.from_float(m, cfg.group_size, cfg.algorithm) if _matmul_nbits(m, cfg)
                   else _from_float(m, cfg.method, bits, cfg.per_channel, n in acts, backend) for n, m in layers.items()}
            if cfg.method == "weight_only":
                grouped = sum(isinstance(m, QuantMatMulNBits) for m in new.values())
                notes.append(f"weight_only: int{bits} weights, dequantized once at first use; compute stays float32 in "
                             "PyTorch (smaller file, no speed-up there)"
                             + (f"; {grouped} Linear/Conv1D layer(s) in groups of {cfg.group_size} input values, "
                                f"{ALGORITHM_LABELS[cfg.algorithm]}, as ONNX Runtime's MatMulNBits holds them (export "
                                "format onnx_int4 runs them as 4-bit kernels)" if grouped else ""))
                if grouped and cfg.algorithm == "hqq":
                    notes.append("hqq: ONNX Runtime's MatMulNBits may run float zero points on a slower CPU path "
                                 "than 4-bit ones (0.30x the float file's decode speed in benchmarks/bench_lm.py); "
                                 "the deploy section times this row's file")
                convs = len(new) - grouped
                if grouped and convs and bits == 4:
                    notes.append(f"weight_only int4: {convs} convolution(s) hold 4-bit per-channel weights in PyTorch, "
                                 "but the onnx_int4 file keeps convolutions float (MatMulNBits is a MatMul kernel): "
                                 "the file is the float model with 4-bit Linear layers, judged against it by "
                                 "deploy.fidelity; exclude the convolutions to make PyTorch compute what ships")
        else:
            with ctx.ui.progress(f"{ctx.name}: calibrating", len(batches)) as bar:
                ranges = calibrate(model, layers, acts, batches, cfg.observer, cfg.percentile, bar)
            if cfg.method == "qat":
                model, ranges = self._qat(model, layers, acts, ranges, ctx)
            for n, m in layers.items():
                q = _from_float(m, "static", 8, cfg.per_channel, n in acts, backend)
                q.set_activation_ranges(*ranges[n])
                new[n] = q
        for n, why in breaks_model(model, new, spec).items():
            new.pop(n)
            skipped[n] = why
        if not new:
            raise StageConfigError(ctx.name, "no quantizable layer left: "
                                   + "; ".join(f"{n}: {w}" for n, w in skipped.items()))
        for n, m in new.items():
            model = set_submodule(model, n, m)
        return model, new, folds, acts

    def _calibration(self, ctx: StageContext) -> list[Any]:
        if len(ctx.data.calibration) == 0:  # type: ignore[arg-type]
            raise StageConfigError(ctx.name, f"method {self.config.method} needs calibration data, but the "
                                             "calibration split is empty; raise data.calibration_samples")
        return [float_to(x, torch.float32) for x, _ in ctx.batches("calibration", self.config.calibration.batches,
                                                                         self.config.calibration.batch_size)]

    def _qat(self, model: nn.Module, layers: dict[str, nn.Module], acts: dict[str, Callable],
             ranges: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.config
        wrappers = {n: _FakeQuant(m, acts.get(n), ranges[n][0], ranges[n][1], cfg.per_channel) for n, m in layers.items()}
        for n, w in wrappers.items():
            model = set_submodule(model, n, w)
        for m in model.modules():  # BatchNorm not folded into a quantized conv keeps its statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        ctx.fit(model, cfg.qat, label=f"{ctx.name} (qat)")
        model.to("cpu").eval()
        for n, w in wrappers.items():
            model = set_submodule(model, n, w.layer)
        return model, {n: w.current() for n, w in wrappers.items()}

    def _handoff(self, state: ModelState, ctx: StageContext, layers: dict[str, nn.Module], notes: list[str],
                 acc: float) -> StageResult:
        cfg = self.config
        state.put(self._export_record(ctx, cfg.method, list(layers)).model_copy(update={"float_stage": None}))
        notes.append(f"backend onnxruntime: the torch model stays float32; the export stage (format onnx_int8) "
                     f"quantizes the ONNX graph with ONNX Runtime ({cfg.method}, {cfg.observer} calibration)")
        table = [{"layer": n, "type": type(m).__name__, "quantized": "at export", "as": f"onnxruntime {cfg.method}",
                  "reason": ""} for n, m in layers.items()]
        details = {"method": cfg.method, "dtype": cfg.dtype, "backend": "onnxruntime", "emulated": False,
                   "accuracy": {"before": acc, "after": acc, "change": 0.0},
                   "tables": {"per layer": table}}
        return StageResult(state=state, kind="quantized", notes=notes, details=details)

    def _export_record(self, ctx: StageContext, method: str, layers: list[str], keep_float: list[str] | None = None,
                       grouped: list[str] | None = None, head: dict[str, str] | None = None) -> QuantizeRecord:
        """The hand-off to export and deploy, saved with the model: int8 runtimes re-quantize the float model
        of the stage before this one with these settings (the torch layers export as their float emulation)."""
        cfg = self.config
        previous = list(ctx.history)[-1] if ctx.history else "baseline"
        handoff = None
        if method == "weight_only" and grouped:  # 4-bit Linear/Conv1D layers: the onnx_int4 file holds them
            return QuantizeRecord(method=method, float_stage=previous,
                                  onnx_int4=OnnxInt4Handoff(block_size=cfg.group_size, algorithm=cfg.algorithm,
                                                            compute=cfg.int4_compute,
                                                            layers=grouped, float_layers=dict(head or {})))
        if method in ("static", "qat", "dynamic"):
            handoff = OnnxInt8Handoff(method="dynamic" if method == "dynamic" else "static",
                                      per_channel=cfg.per_channel, observer=cfg.observer,
                                      percentile=cfg.percentile if cfg.observer == "percentile" else None,
                                      calibration_batches=max(cfg.calibration.batches, 1),
                                      batch_size=cfg.calibration.batch_size or ctx.recipe.data.eval_batch_size,
                                      keep_float=sorted(keep_float or []))
        return QuantizeRecord(method=method, float_stage=None if method == "qat" else previous, onnx_int8=handoff)

    @staticmethod
    def _table(types: dict[str, str], new: dict[str, nn.Module], folds: dict[str, str], skipped: dict[str, str],
               acts: dict[str, Callable], cfg: QuantizeConfig, kept: set[str] | None = None,
               weights: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """One row per layer that holds weights or that the stage changed: none is left out unseen."""
        folded_into = {b: c for c, b in folds.items()}
        rows = []
        for name, kind in types.items():
            row = {"layer": name, "type": kind, "quantized": "no", "as": "float32", "reason": ""}
            if name in new:
                m = new[name]
                if isinstance(m, QuantMatMulNBits):
                    row.update(quantized="yes", **{"as": f"int{m.bits} weight-only, groups of {m.block_size}"})
                elif isinstance(m, QuantLayer):
                    extras = [m.mode.replace("_", "-"), "per-channel" if m.per_channel else "per-tensor"]
                    extras += ["+relu"] if name in acts else []
                    extras += [f"+{folds[name]}"] if name in folds else []
                    row.update(quantized="yes", **{"as": f"int{m.bits} " + " ".join(extras)})
                else:
                    row.update(quantized="yes", **{"as": cfg.method + (f" +{folds[name]}" if name in folds else "")})
            elif name in folded_into:
                row.update(quantized="folded", reason=f"folded into {folded_into[name]}")
            elif name in skipped:
                row["reason"] = skipped[name]
            elif name in (kept or set()):
                row["reason"] = "kept float: among the most sensitive layers (keep_float)"
            elif kind in ("Conv2d", "Linear"):
                row["reason"] = ("dynamic quantizes Linear only" if cfg.method == "dynamic" and kind == "Conv2d"
                                 else "excluded by include/exclude")
            elif "Norm" in kind:  # BatchNorm2d, LayerNorm, GroupNorm, a model's RMSNorm
                row["reason"] = "normalisation stays float32"
            elif kind in ("LSTM", "GRU", "Conv1d", "Conv3d", "ConvTranspose2d", "Embedding") \
                    or (weights or {}).get(name):
                row["reason"] = (f"{kind} (transformers' GPT-2 style: weight stored transposed) is not quantized by "
                                 f"this stage" if kind == "Conv1D" else f"{kind} is not quantized by this stage")
            else:
                continue  # containers and parameter-free layers
            rows.append(row)
        return rows


def _float_weight_note(table: list[dict[str, Any]], weights: dict[str, int], params: int) -> list[str]:
    """A note when layers holding weights stay float for a reason other than the user's choice: which kinds, how
    many, and their share of the parameters (GPT-2's Conv1D, embeddings, recurrent layers)."""
    rows = [r for r in table if r["quantized"] == "no" and "not quantized by this stage" in r["reason"]]
    if not rows:
        return []
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["type"]] = kinds.get(r["type"], 0) + 1
    share = sum(weights.get(r["layer"], 0) for r in rows) / max(params, 1)
    return [f"{len(rows)} layer(s) holding weights stay float32, {share:.0%} of the parameters ("
            + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + "): this stage does not quantize them; see the per-layer table"]


def output_layer(model: nn.Module) -> str | None:
    """The name of a language model's output layer (transformers' `get_output_embeddings`), if it has one."""
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        if not callable(get) or not hasattr(module, "config"):
            continue
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(head, nn.Module):
            return next((n for n, m in model.named_modules() if m is head), None)
    return None


def _matmul_nbits(layer: nn.Module, cfg: QuantizeConfig) -> bool:
    """Whether weight_only int4 holds this layer group-wise (Linear, Conv1D), as ONNX Runtime's MatMulNBits."""
    return cfg.method == "weight_only" and cfg.dtype == "int4" and (isinstance(layer, nn.Linear) or is_conv1d(layer))


def _as_linear(layer: nn.Module) -> nn.Module:
    """A transformers Conv1D (y = x @ W + b, W [in, out]) as the nn.Linear that computes the same; others as they
    are."""
    if not is_conv1d(layer):
        return layer
    weight = getattr(layer, "weight").detach()  # noqa: B009 - typed as a tensor here
    bias = getattr(layer, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def _from_float(layer: nn.Module, mode: str, bits: int, per_channel: bool, relu: bool,
                backend: QuantBackend) -> QuantLayer:
    layer = _as_linear(layer)
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    return cls.from_float(layer, mode, bits, per_channel, relu, quantizer=backend.quantize_weight)  # type: ignore[arg-type]


def _count_params(model: nn.Module) -> int:
    from compresspipe.metrics import count_params

    return count_params(model)


def _accuracy(model: nn.Module, loader: Any, task: str = "classification") -> float:
    """The task's default metric (top-1 accuracy for classification)."""
    from compresspipe.metrics import evaluate

    return evaluate(model, loader, "cpu", task)[0]


class _FileJudge:
    """Accuracy of the deploy runtime's int8 file for a mixed-precision candidate, built as the executor will build
    the quantize row's file: the float model before this stage, quantized by the runtime with this stage's settings
    and the float layers excluded."""

    def __init__(self, state: ModelState, ctx: StageContext, stage: QuantizeStage):
        import dataclasses

        from compresspipe.recipe.spec import RUNTIME_FORMATS

        # each candidate is judged as it is: the export's own automatic mixed precision stays out of it
        deploy = ctx.recipe.deploy
        recipe = ctx.recipe.model_copy(update={"deploy": deploy.model_copy(update={
            "fidelity": deploy.fidelity.model_copy(update={"mixed_precision": False})})})
        ctx = dataclasses.replace(ctx, recipe=recipe)
        self.state, self.ctx, self.stage = state, ctx, stage
        self.float_fmt, self.int8_fmt = RUNTIME_FORMATS[ctx.recipe.deploy_runtime()]
        self.root = ctx.stage_dir / ".keep-float"
        shutil.rmtree(self.root, ignore_errors=True)
        self.count = 0

    @staticmethod
    def usable(ctx: StageContext) -> bool:
        previous = list(ctx.history)[-1] if ctx.history else None
        return ctx.recipe.deploy_runtime() == "onnxruntime" and previous is not None

    def describe(self) -> str:
        return f"judged on the {self.int8_fmt} file in {self.ctx.recipe.deploy_runtime()}"

    def _ship(self, fmt: str, state: ModelState) -> float:
        from compresspipe.stages.ship import ship

        folder = self.root / f"{self.count:02d}"
        self.count += 1
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return float(ship(fmt, state, self.ctx, folder, {}, {})["accuracy"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def reference(self) -> float:
        """The float model's accuracy in the same runtime (what the executor measured, when it did)."""
        formats = self.ctx.input_metrics.get("formats") or {}
        measured = (formats.get(self.float_fmt) or {}).get("accuracy")
        if isinstance(measured, float):
            return measured
        return self._ship(self.float_fmt, self.state)

    def accuracy(self, quantized: list[str], kept: list[str]) -> float:
        candidate = self.state.clone()
        candidate.put(self.stage._export_record(self.ctx, self.stage.config.method, quantized, kept))
        return self._ship(self.int8_fmt, candidate)
