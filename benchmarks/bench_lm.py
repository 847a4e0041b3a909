"""Decoder LMs in ONNX Runtime: int4 weight-only and prune + distill against the float file, all files with a
key/value cache, decode tokens per second timed interleaved in one process (1 thread, batch 1 and 8).

1. `recipes/causal_lm.yaml`'s Llama-style model (4 blocks, hidden 384, grouped-query attention), trained on the
   bundled English text. Three runs from the same seed: train -> int4 weight-only, round-to-nearest and HQQ
   (quantize.algorithm: hqq); and the recipe's own train -> prune (half the KV groups, a quarter of the MLP width) + distill -> int4. Rows: perplexity of each file
   on the validation text (measured in ONNX Runtime), size, prefill and decode tokens/s, ratios to the float file,
   and the peak resident memory of a process that loads the file and generates at batch 1 (ONNX Runtime's own
   memory in `runtime MiB`).
   Issue 24's goals: int4 >= 4x smaller, >= 2x decode at batch 1, perplexity +5% at most; prune + distill +10% at
   most and >= 1.3x decode.
2. The same recipe at 2 blocks and hidden 128 (0.4M parameters): float against int4, where int4 does not pay (the
   weights fit in L2 and a decode step is mostly ONNX Runtime's cost per node).
3. A ~100M-parameter Llama-style config (12 blocks, hidden 768, 12 heads, 4 key/value heads, random weights, no
   training) through prune -> int4 -> export: wall time and peak resident memory of the whole run, and of a
   process that only loads the pruned float file or the int4 file and generates with it.

`BENCH_LM=small`, `tiny` or `large` runs one part.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import run_recipe_dict, stage

TITLE = "decoder LMs in ONNX Runtime (KV cache): int4 weight-only and prune + distill vs the float file"
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "causal_lm.yaml"
LARGE = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 2048,
         "max_position_embeddings": 512, "tie_word_embeddings": True}
INT4 = {"type": "quantize", "method": "weight_only", "dtype": "int4"}
TINY = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 344}


def _run(recipe: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The run's report, also when a gate failed (an int4 file below deploy.fidelity is a figure too)."""
    try:
        return run_recipe_dict(recipe, folder)
    except Exception as exc:  # GateFailed carries the report
        report = getattr(exc, "report", None)
        if report is None:
            raise
        return dict(report)


def _small() -> list[dict[str, Any]]:
    base = yaml.safe_load(RECIPE.read_text())
    base["deploy"] = {"runtime": "onnxruntime", "rounds": 3}
    base["evaluate"] = {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 3, "threads": 1}}
    train = base["stages"][0]
    plain = {**base, "name": "lm-int4", "stages": [train, INT4]}
    hqq = {**base, "name": "lm-int4-hqq", "stages": [train, {**INT4, "algorithm": "hqq"}]}
    pruned = {**base, "name": "lm-prune-int4", "stages": [*base["stages"], INT4]}
    folders = {k: Path(tempfile.mkdtemp(prefix=f"cp-bench-lm-{k}-")) for k in ("int4", "hqq", "prune")}
    _run(plain, folders["int4"])
    _run(hqq, folders["hqq"])  # the same seed: the same trained float model, 4-bit groups fitted by HQQ
    _run(pruned, folders["prune"])
    return measure_runs(folders["int4"] / "run", folders["prune"] / "run", hqq=folders["hqq"] / "run")


def measure_runs(plain: Path, pruned: Path, rounds: int = 5, hqq: Path | None = None) -> list[dict[str, Any]]:
    """Rows from the run folders: each file's perplexity and size from its report, decode tokens/s timed here,
    every file once per round (interleaved)."""
    files = {"float": (plain, "train"), "int4": (plain, "quantize"),
             **({"int4 hqq": (hqq, "quantize")} if hqq is not None else {}),
             "prune+distill": (pruned, "prune"), "prune+distill int4": (pruned, "quantize")}
    return measure_files(files, rounds)


def measure_files(files: dict[str, tuple[Path, str]], rounds: int = 5) -> list[dict[str, Any]]:
    """{label: (run folder, stage)} -> rows; the first file is the reference of the ratios."""
    import json

    from compresspipe.runtimes.kv_cache import decode_speed
    from compresspipe.runtimes.memory import peak_memory
    from compresspipe.runtimes.onnx_float import session

    reports = {folder: json.loads((folder / "report.json").read_text()) for folder, _ in files.values()}
    sessions, rows = {}, []
    for label, (folder, name) in files.items():
        row = stage(reports[folder], name)
        sessions[label] = session(folder / row["files"][0], 1).raw
        fid = row.get("fidelity") or {}
        memory = peak_memory(folder / row["files"][0], 1, 1)  # a process of its own: ONNX Runtime + this file
        rows.append({"case": label, "file": row["files"][0], "perplexity": row.get("score"), "bytes": row.get("bytes"),
                     "token agreement": fid.get("agreement") if fid.get("source") == "float model" else None,
                     "gate": "pass" if fid.get("passed", True) else "FAIL",
                     "peak MiB b1": memory and memory["peak_mib"], "runtime MiB": memory and memory["runtime_mib"]})
    speeds: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in sessions}
    for _ in range(rounds):  # interleaved: every file once per round, so load hits all alike
        for label, sess in sessions.items():
            for batch in (1, 8):
                speeds[label][batch].append(decode_speed(sess, batch, prompt=32, tokens=32, rounds=1)
                                            ["decode_tokens_per_s"])
    ref = rows[0]
    first = {b: statistics.median(v) for b, v in speeds[ref["case"]].items()}
    for r in rows:
        tps = {b: statistics.median(v) for b, v in speeds[r["case"]].items()}
        r["decode tok/s b1"], r["decode tok/s b8"] = tps[1], tps[8]
        r["size x"] = ref["bytes"] / r["bytes"] if r["bytes"] else None
        r["ppl +%"] = 100 * (r["perplexity"] / ref["perplexity"] - 1) if r["perplexity"] and ref["perplexity"] else None
        r["decode x b1"], r["decode x b8"] = tps[1] / first[1], tps[8] / first[8]
    return rows


def _tiny() -> list[dict[str, Any]]:
    """The recipe at 2 blocks and hidden 128 (0.4M parameters, 1.7 MB of float weights, which fit in L2): where int4
    does not pay, a decode step being mostly ONNX Runtime's cost per node. One run: train -> int4."""
    base = yaml.safe_load(RECIPE.read_text())
    base["model"]["huggingface"]["config"].update(TINY)
    base["deploy"] = {"runtime": "onnxruntime", "rounds": 3}
    base["evaluate"] = {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 3, "threads": 1}}
    train = {**base["stages"][0], "epochs": 2}
    folder = Path(tempfile.mkdtemp(prefix="cp-bench-lm-tiny-"))
    _run({**base, "name": "lm-tiny-int4", "stages": [train, INT4]}, folder)
    return measure_files({"tiny float": (folder / "run", "train"), "tiny int4": (folder / "run", "quantize")})


def _large() -> list[dict[str, Any]]:
    recipe = {
        "compresspipe": 1, "name": "llama-100m", "seed": 0, "device": "cpu", "task": "language_modeling",
        "model": {"huggingface": {"config": LARGE}},
        "data": {"dataset": "synthetic-text", "vocab_size": 32000, "seq_len": 64, "samples": 64, "batch_size": 8,
                 "eval_batch_size": 8},
        "evaluate": {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 2, "threads": 2}},
        "deploy": {"runtime": "onnxruntime", "rounds": 3},  # every row's ONNX file (with a cache), as shipped
        "stages": [{"type": "prune", "method": "structured", "amount": 0.25, "heads": 0.5, "kv_groups": "whole"},
                   INT4, {"type": "export", "formats": ["onnx_int4"], "verify": {"batches": 1}}],
    }
    folder = Path(tempfile.mkdtemp(prefix="cp-bench-lm-large-"))
    t0 = time.perf_counter()
    report = _run(recipe, folder)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    int4 = folder / "run" / "03-export" / "export" / "model.int4.onnx"
    # the float reference: the pruned model's own file, the float graph the int4 file was made from
    from compresspipe.runtimes.kv_cache import decode_speed
    from compresspipe.runtimes.onnx_float import session

    float_file = folder / "run" / "01-prune" / "deploy" / "model.onnx"
    sessions = {"float": session(float_file, 1).raw, "int4": session(int4, 1).raw}
    speeds: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(3):
        for label, sess in sessions.items():
            speeds[label].append(decode_speed(sess, 1, prompt=32, tokens=16, rounds=1)["decode_tokens_per_s"])
    decode = {k: statistics.median(v) for k, v in speeds.items()}
    from compresspipe.runtimes.memory import peak_memory

    memory = {k: peak_memory(p, 1, 1, tokens=8) for k, p in (("float", float_file), ("int4", int4))}
    return [{"case": "llama ~100M: prune -> int4 -> export", "params before": stage(report, "baseline").get("params"),
             "params after": stage(report, "prune").get("params"), "int4 file MiB": int4.stat().st_size / 2**20,
             "float file MiB": float_file.stat().st_size / 2**20, "decode tok/s b1 float": decode["float"],
             "decode tok/s b1 int4": decode["int4"], "decode x b1": decode["int4"] / decode["float"],
             "wall s": wall, "peak RSS MiB": peak,
             **{f"generate peak MiB {k}": m and m["peak_mib"] for k, m in memory.items()}}]


def run() -> list[dict[str, Any]]:
    part = os.environ.get("BENCH_LM", "")
    rows: list[dict[str, Any]] = []
    if part in ("", "small"):
        rows += _small()
    if part in ("", "tiny"):
        rows += _tiny()
    if part in ("", "large"):
        rows += _large()
    return rows
