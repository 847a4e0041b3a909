"""Decoder LMs in ONNX Runtime: int4 weight-only and prune + distill against the float file, all files with a
key/value cache, decode tokens per second timed interleaved in one process (1 thread, batch 1 and 8).

1. `recipes/causal_lm.yaml`'s Llama-style model (2 blocks, hidden 128, grouped-query attention), trained on the
   bundled English text. Two runs from the same seed: train -> int4 weight-only; and the recipe's own
   train -> prune (half the KV groups, a quarter of the MLP width) + distill -> int4. Rows: perplexity of each file
   on the validation text (measured in ONNX Runtime), size, prefill and decode tokens/s, ratios to the float file.
   Issue 24's goals: int4 >= 4x smaller, >= 2x decode at batch 1, perplexity +5% at most; prune + distill +10% at
   most and >= 1.3x decode.
2. A ~100M-parameter Llama-style config (12 blocks, hidden 768, 12 heads, 4 key/value heads, random weights, no
   training) through prune -> int4 -> export: wall time and peak resident memory.

`BENCH_LM=small` or `BENCH_LM=large` runs one part.
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


def _small(rounds: int = 5) -> list[dict[str, Any]]:
    from compresspipe.stages.export.kv_cache import decode_speed
    from compresspipe.stages.export.onnx_float import session

    base = yaml.safe_load(RECIPE.read_text())
    base["deploy"] = {"runtime": "onnxruntime", "rounds": 3}
    base["evaluate"] = {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 3, "threads": 1}}
    train = base["stages"][0]
    plain = {**base, "name": "lm-int4", "stages": [train, INT4]}
    pruned = {**base, "name": "lm-prune-int4", "stages": [*base["stages"], INT4]}
    folders = {k: Path(tempfile.mkdtemp(prefix=f"cp-bench-lm-{k}-")) for k in ("int4", "prune")}
    runs = {"int4": run_recipe_dict(plain, folders["int4"]), "prune": run_recipe_dict(pruned, folders["prune"])}
    files = {
        "float": (runs["int4"], "train"),
        "int4": (runs["int4"], "quantize"),
        "prune+distill": (runs["prune"], "prune"),
        "prune+distill int4": (runs["prune"], "quantize"),
    }
    sessions, rows = {}, []
    for label, (report, name) in files.items():
        row = stage(report, name)
        folder = folders["int4" if report is runs["int4"] else "prune"] / "run"
        path = folder / row["files"][0] if row.get("files") else None
        sessions[label] = session(path, 1).raw if path else None
        rows.append({"case": label, "file": row.get("files", ["?"])[0], "perplexity": row.get("score"),
                     "bytes": row.get("bytes")})
    speeds: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in sessions}
    for _ in range(rounds):  # interleaved: every file once per round, so load hits all alike
        for label, sess in sessions.items():
            for batch in (1, 8):
                speeds[label][batch].append(decode_speed(sess, batch, prompt=32, tokens=32, rounds=1)
                                            ["decode_tokens_per_s"])
    ref = rows[0]
    for r in rows:
        tps = {b: statistics.median(v) for b, v in speeds[r["case"]].items()}
        r["decode tok/s b1"], r["decode tok/s b8"] = tps[1], tps[8]
        r["size x"] = ref["bytes"] / r["bytes"] if r["bytes"] else None
        r["ppl +%"] = 100 * (r["perplexity"] / ref["perplexity"] - 1) if r["perplexity"] and ref["perplexity"] else None
        r["decode x b1"] = tps[1] / statistics.median(speeds["float"][1])
        r["decode x b8"] = tps[8] / statistics.median(speeds["float"][8])
    return rows


def _large() -> list[dict[str, Any]]:
    recipe = {
        "compresspipe": 1, "name": "llama-100m", "seed": 0, "device": "cpu", "task": "language_modeling",
        "model": {"huggingface": {"config": LARGE}},
        "data": {"dataset": "synthetic-text", "vocab_size": 32000, "seq_len": 64, "samples": 64, "batch_size": 8,
                 "eval_batch_size": 8},
        "evaluate": {"latency": {"batch_sizes": [1], "warmup": 1, "iters": 2, "threads": 2}},
        "deploy": {"runtime": "torch"},
        "stages": [{"type": "prune", "method": "structured", "amount": 0.25, "heads": 0.5, "kv_groups": "whole"},
                   INT4, {"type": "export", "formats": ["onnx_int4"], "verify": {"batches": 1}}],
    }
    folder = Path(tempfile.mkdtemp(prefix="cp-bench-lm-large-"))
    t0 = time.perf_counter()
    report = run_recipe_dict(recipe, folder)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    int4 = folder / "run" / "03-export" / "export" / "model.int4.onnx"
    return [{"case": "llama ~100M: prune -> int4 -> export", "params before": stage(report, "baseline").get("params"),
             "params after": stage(report, "prune").get("params"), "int4 file MiB": int4.stat().st_size / 2**20,
             "wall s": wall, "peak RSS MiB": peak}]


def run() -> list[dict[str, Any]]:
    part = os.environ.get("BENCH_LM", "")
    rows: list[dict[str, Any]] = []
    if part in ("", "small"):
        rows += _small()
    if part in ("", "large"):
        rows += _large()
    return rows
