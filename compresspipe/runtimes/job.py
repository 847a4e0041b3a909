"""What every format module receives (an `ExportJob`) and the checks they share.

A format module is three functions: ``available() -> str | None`` (why it cannot run here),
``export(job, folder) -> list[Path]`` and ``verify(files, job) -> dict`` (max_abs_diff, top1_agreement,
accuracy, the task's metrics, latency_ms). Verification compares with the PyTorch model on the same validation
batches. A batch is one tensor or a dict of named tensors (`models.inputs`); the model's inputs spec
(`state.spec`) names the file's inputs and says which axes are dynamic.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compresspipe.models.inputs import batch_len, example, forward, take
from compresspipe.ui import MAX_WARNING_NOTES, library_messages  # noqa: F401 - MAX_WARNING_NOTES: its limit

if TYPE_CHECKING:
    from compresspipe.artifacts.io import ModelIO
    from compresspipe.artifacts.model import ModelState
    from compresspipe.recipe.spec import LatencySpec
    from compresspipe.runtimes.handoff import OnnxInt8Handoff
    from compresspipe.stages.export import ExportConfig
    from compresspipe.ui import UI

INPUT_NAME = "input"
NEAR_CHANCE = 1.5  # a source below 1.5x chance accuracy has not learned (the report warns about it too)
OUTPUT_NAME = "logits"


@dataclass
class ExportJob:
    """The model to export, its verification batches and PyTorch's answers on them."""

    config: ExportConfig
    state: ModelState
    module: nn.Module  # eval mode, on CPU
    stage: str
    batches: list[tuple[Any, torch.Tensor]]  # validation (inputs, labels)
    reference: list[torch.Tensor]  # the PyTorch model's logits on `batches`
    calibration: Callable[[int, int], Iterator[Any]]  # (batch_size, batches) -> input batches
    latency: LatencySpec | None = None
    handoff: OnnxInt8Handoff | None = None  # the int8 files' settings: a quantize stage's, else the export block's
    float_module: nn.Module | None = None  # the float model int8 formats quantize (after a quantize stage)
    cpu: str = "portable"  # deploy.cpu, resolved: the CPUs int8 files must be exact on (deploy.cpu module)
    ui: UI | None = None  # progress of long steps (calibration)
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Path] = field(default_factory=dict)  # files one format leaves for another (float onnx)

    num_classes: int | None = None
    metrics: list[str] = field(default_factory=list)  # metrics beyond the task's that gates name
    # the float source's answers on `batches` (int8 formats are judged against the model they quantize)
    float_reference: list[torch.Tensor] | None = None
    fidelity: Any = None  # the recipe's deploy.fidelity (FidelitySpec): how closely a file must follow its source
    float_layers: list[str] = field(default_factory=list)  # what the int8 file kept float, and why (notes)
    diagnosis: list[dict[str, Any]] = field(default_factory=list)  # the int8 file's most diverging layers
    # how much of its top-1 the float model itself keeps under int8-sized input and weight noise (a failed gate)
    stability: dict[str, Any] | None = None
    tokenizer: Callable[[], Any] | None = None  # the run's text tokenizer (data/text.py), built when asked for

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.state.input_shape)

    @property
    def io(self) -> ModelIO:
        return self.state.spec

    @property
    def input_names(self) -> list[str]:
        """The file's input names: `input` for one tensor, else the model's argument names."""
        return self.io.names

    @property
    def dtype(self) -> torch.dtype:
        return input_dtype(self.module)

    def example(self, batch: int = 2) -> Any:
        """A deterministic input; batch 2 so torch.export does not specialise the batch dimension to 1."""
        return example(self.io, batch, float_dtype=self.dtype)


def input_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its first floating parameter), float32 by default."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def agreement(task: str, out: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
              margin: float = 0.0) -> tuple[int, int]:
    """(agreeing, compared): rows (samples, or labelled positions) whose top class is PyTorch's; regression:
    values within 5% of the spread of PyTorch's outputs (at least 1e-6) of them. With `margin`, rows where the
    reference scores its top two classes within `margin` logits of each other are ties and not compared."""
    from compresspipe.metrics.tasks import TASKS, flatten

    if TASKS[task].float_targets:
        tol = max(float(ref.float().std()) * 0.05 if ref.numel() > 1 else 0.0, 1e-6)
        return int(((out.float() - ref.float()).abs() <= tol).sum()), int(ref.numel())
    o, lab = flatten(task, out, labels)
    r, _ = flatten(task, ref, labels)
    same = o.argmax(dim=1) == r.argmax(dim=1)
    if margin > 0 and r.shape[1] > 1:
        top2 = r.float().topk(2, dim=1).values
        decided = (top2[:, 0] - top2[:, 1]) >= margin
        return int((same & decided).sum()), int(decided.sum())
    return int(same.sum()), int(lab.numel())


def per_position(job: ExportJob) -> bool:
    from compresspipe.metrics.tasks import TASKS

    return bool(TASKS[job.io.task].per_position)


def compare(job: ExportJob, run: Callable[[Any], torch.Tensor]) -> dict[str, Any]:
    """Run `run` on every verification batch; its difference from PyTorch, and the task's metrics (accuracy,
    loss, ...) of its outputs."""
    from compresspipe.metrics.measure import task_figures
    from compresspipe.metrics.scores import Scorer

    task = job.io.task
    from compresspipe.metrics.tasks import TASKS

    scorer = Scorer(task, job.num_classes, list(dict.fromkeys([*TASKS[task].metrics, *job.metrics])))
    ref_scorer = Scorer(task, job.num_classes, ["top1"] if task != "regression" else ["mse"])
    src_scorer = Scorer(task, job.num_classes, ["top1"] if task != "regression" else ["mse"])
    sources: list[torch.Tensor | None] = (list(job.float_reference) if job.float_reference is not None
                                          else [None for _ in job.reference])
    max_diff, agree, compared, count, src_agree, src_compared = 0.0, 0, 0, 0, 0, 0
    max_ref = 0.0  # the largest finite |output| of PyTorch: the scale verify.rtol is relative to
    own_agree, own_compared = 0, 0
    margin = job.fidelity.tie_margin if job.fidelity is not None else 0.0
    for (inputs, labels), ref, src in zip(job.batches, job.reference, sources, strict=True):
        out = torch.as_tensor(run(inputs)).float().reshape(ref.shape)
        ref = ref.float()
        diff = float((out - ref).abs().max())
        if not diff <= max_diff and max_diff == max_diff:  # a NaN sticks (max() would drop it)
            max_diff = diff
        max_ref = max(max_ref, float(torch.nan_to_num(ref.abs(), 0.0, 0.0, 0.0).max()) if ref.numel() else 0.0)
        scorer.update(out, labels)
        ref_scorer.update(ref, labels)
        a, c = agreement(task, out, ref, labels)
        agree, compared = agree + a, compared + c
        if src is not None:
            src_scorer.update(src.float(), labels)
            a, c = agreement(task, out, src.float().reshape(ref.shape), labels, margin)
            src_agree, src_compared = src_agree + a, src_compared + c
        a, c = agreement(task, out, ref, labels, margin)
        own_agree, own_compared = own_agree + a, own_compared + c
        count += int(labels.shape[0])
    figures = task_figures(scorer.result(), task)
    out_metrics = {
        "samples": count,
        "max_abs_diff": max_diff,
        "max_abs_output": max_ref,
        "top1_agreement": agree / max(compared, 1),
        **figures,
        "pytorch_accuracy": ref_scorer.result().get("top1"),
    }
    out_metrics["decided_agreement"] = own_agree / own_compared if own_compared else 1.0
    out_metrics["decided"] = own_compared
    if job.float_reference is not None:
        out_metrics["source_agreement"] = src_agree / src_compared if src_compared else 1.0
        out_metrics["decided"] = src_compared
        out_metrics["source_accuracy"] = src_scorer.result().get("top1")
    return out_metrics


def fidelity(metrics: dict[str, Any], job: ExportJob, int8: bool) -> dict[str, Any]:
    """How closely a file follows the model it came from (deploy.fidelity): an int8 file its float source, any
    other file the PyTorch model of its stage. `passed` False means the file must not ship."""
    spec = job.fidelity
    against_float = int8 and metrics.get("source_agreement") is not None
    agree = metrics["source_agreement"] if against_float else metrics.get("decided_agreement",
                                                                          metrics["top1_agreement"])
    source_acc = metrics["source_accuracy"] if against_float else metrics.get("pytorch_accuracy")
    acc = metrics.get("accuracy")
    drop = source_acc - acc if isinstance(source_acc, float) and isinstance(acc, float) else None
    samples = max(int(metrics.get("samples") or 1), 1)
    min_agreement = spec.min_agreement if spec is not None else 0.99
    max_drop = spec.max_drop if spec is not None else 0.01
    failures = []
    # agreement with a model that has not learned (near chance, as the report warns) measures noise: its calls
    # flip under any rounding; such a file is judged by its accuracy alone
    chance = 1 / job.num_classes if job.num_classes else None
    near_chance = chance is not None and isinstance(source_acc, float) and source_acc < NEAR_CHANCE * chance
    if near_chance:
        pass
    elif not agree >= min_agreement - 1e-12:
        failures.append(f"top-1 agreement with {'its float source' if against_float else 'the PyTorch model'} "
                        f"{agree:.4f} < {min_agreement} (on {metrics.get('decided', samples)} samples it does not "
                        "score as ties)")
    if drop is not None and drop > max_drop + 1 / samples + 1e-12:
        failures.append(f"accuracy {100 * drop:.2f} points below {'its float source' if against_float else 'PyTorch'}"
                        f" (max_drop {max_drop})")
    return {"source": "float model" if against_float else "pytorch model", "agreement": agree, "drop": drop,
            "agreement_judged": not near_chance,
            "samples": samples, "ties": samples - int(metrics.get("decided", samples)) if not per_position(job)
            else None, "tie_margin": spec.tie_margin if spec is not None else 0.0, "min_agreement": min_agreement, "max_drop": max_drop, "passed": not failures,
            "failures": failures}


def per_sample(run: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
    """Wrap a fixed-batch-1 runner so it takes any batch (one call per sample)."""

    def runner(inputs: Any) -> torch.Tensor:
        return torch.cat([torch.as_tensor(run(take(inputs, slice(i, i + 1)))) for i in range(batch_len(inputs))])

    return runner


def time_batches(job: ExportJob, run: Callable[[Any], Any], batch_sizes: list[int] | None = None,
                 prepare: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
    """Median milliseconds per call at each latency batch size (evaluate.latency), in the file's runtime.

    `prepare` turns the input tensor into what `run` takes (e.g. a numpy feed) once, outside the timing:
    the figure is the runtime's call, not our conversions around it.
    """
    spec = job.latency
    if spec is None or not spec.enabled:
        return {}
    sizes = list(spec.batch_sizes) if batch_sizes is None else [b for b in spec.batch_sizes if b in batch_sizes]
    out: dict[str, float] = {}
    for bs in sizes:
        x = example(job.io, bs, float_dtype=job.dtype)
        x = prepare(x) if prepare is not None else x
        for _ in range(spec.warmup):
            run(x)
        times = []
        for _ in range(max(1, spec.iters)):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        out[str(bs)] = statistics.median(times) * 1000.0
    return out


def torch_runner(module: nn.Module) -> Callable[[Any], torch.Tensor]:
    def run(inputs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return forward(module, inputs)

    return run


class torch_threads:
    """Pin torch's intra-op threads for a latency measurement, then restore them."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


@dataclass(frozen=True)
class Exporter:
    """One format behind the common interface; `available` says why it cannot run here (None: it can)."""

    name: str
    suffix: str  # file name in the export folder
    available: Callable[[], str | None]
    export: Callable[[ExportJob, Path], list[Path]]
    verify: Callable[[list[Path], ExportJob], dict[str, Any]]
    int8: bool = False
    load_snippet: tuple[str, str] = ("", "")
    fixed_batch: bool = False  # the file runs batch 1 only (verified sample by sample)


def always() -> str | None:
    return None


def dynamic_batch_shapes(job: ExportJob, batch: bool | None = None, infer_ranges: bool = False) -> Any:
    """torch.export dynamic_shapes: the batch axis (unless fixed) and every dynamic sample axis of the inputs spec
    (e.g. the sequence), named as the spec names them; a dict by argument name for named inputs. None: all fixed.

    `infer_ranges`: sample axes are Dim.AUTO, so torch.export itself finds their range (a sequence is bounded by
    the model's position embeddings) instead of refusing a named Dim it cannot prove unbounded.
    """
    batch = job.config.dynamic_batch if batch is None else batch
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if infer_ranges and name != "batch":
            return torch.export.Dim.AUTO
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1 if name == "batch" else 2)
        return dims[name]

    shapes: dict[str, dict[int, Any]] = {}
    for spec in job.io.inputs:
        axes = {0: dim("batch")} if batch else {}
        axes.update({axis + 1: dim(name) for axis, name in spec.dynamic.items()})
        shapes[spec.name] = axes
    if not any(shapes.values()):
        return None
    if job.io.single_tensor:
        return (shapes["input"],)
    return shapes


def onnx_axes(job: ExportJob, batch: bool | None = None) -> dict[str, dict[int, str]]:
    """The same dynamic axes for the TorchScript-based ONNX exporter (names per input, plus the output's batch)."""
    batch = job.config.dynamic_batch if batch is None else batch
    axes = {}
    for spec in job.io.inputs:
        named = ({0: "batch"} if batch else {}) | {a + 1: n for a, n in spec.dynamic.items()}
        if named:
            axes[spec.name] = named
    from compresspipe.metrics.tasks import TASKS

    out = {0: "batch"} if batch else {}
    first = job.io.inputs[0]
    if TASKS[job.io.task].per_position and 0 in first.dynamic:  # logits per position: that axis moves too
        out[1] = first.dynamic[0]
    if out:
        axes[OUTPUT_NAME] = out
    return axes


@contextlib.contextmanager
def warnings_as_notes(job: ExportJob, step: str) -> Iterator[None]:
    """Warnings raised while a step exports or loads a file (deprecations, tracer caveats, the libraries' log
    warnings) become the stage's notes, `step: Category: first line`, each once, where report.md and report.json
    show them, rather than lines scrolling through the progress display (ui.library_messages)."""
    with library_messages(job.notes, prefix=step):
        yield


def int8_settings(job: ExportJob) -> OnnxInt8Handoff:
    """The int8 files' settings: the job's one typed object (the quantize stage's, else the export block's)."""
    from compresspipe.runtimes.handoff import OnnxInt8Handoff

    return job.handoff if job.handoff is not None else OnnxInt8Handoff()
