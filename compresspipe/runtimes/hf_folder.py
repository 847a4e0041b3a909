"""`huggingface`: a folder `transformers` loads with `from_pretrained`: config.json, model.safetensors,
generation_config.json, and for text data the run's tokenizer (tokenizer.json and its config; `<|endoftext|>` as
the end-of-sequence token).

Only for Hugging Face models, and only float ones (pruned, factorized into Linear layers transformers knows,
distilled): a quantized model's layers are compresspipe's own, which transformers cannot load, so such a model is
refused with the formats that do ship it (onnx_int4, onnx_int8). Verified by loading the folder back with
`AutoModelForCausalLM` (or the model's own class) and comparing its logits with the PyTorch model's, and the
tokenizer by encoding validation-like text both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresspipe.runtimes.job import Exporter, ExportJob, compare

FOLDER = "huggingface"
SAMPLE_TEXT = "Compressed models still say what they mean: héllo, wörld.\n\tdef f(x): return x ** 2"


def available() -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install 'compresspipe[huggingface]')"
    return None


def _inner(job: ExportJob) -> Any:
    model = getattr(job.module, "model", None)
    if model is None or not hasattr(model, "save_pretrained"):
        raise ValueError("the huggingface format needs a Hugging Face model (model: huggingface: ...)")
    if any(e.get("kind") == "quantize" for e in job.state.edits):
        raise ValueError("the model holds compresspipe's quantized layers, which transformers cannot load; export "
                         "the huggingface folder before the quantize stage, and ship the quantized model as "
                         "onnx_int4 or onnx_int8")
    return model


def export(job: ExportJob, folder: Path) -> list[Path]:
    model = _inner(job)
    out = folder / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if job.tokenizer is not None:
        from transformers import PreTrainedTokenizerFast

        from compresspipe.data.text import EOS

        tok = PreTrainedTokenizerFast(tokenizer_object=job.tokenizer().to_hf(), eos_token=EOS)
        tok.save_pretrained(str(out))
    else:
        job.notes.append(f"{FOLDER}/: no tokenizer saved (the data is not compresspipe's text dataset); add yours")
    return sorted(p for p in out.rglob("*") if p.is_file())


def verify(files: list[Path], job: ExportJob) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    folder = files[0].parent
    original = _inner(job)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except ValueError:  # not a causal LM: the class the model itself has
        loaded = type(original).from_pretrained(str(folder), local_files_only=True)
    loaded.eval()

    def run(x: Any) -> torch.Tensor:
        with torch.no_grad():
            return loaded(**x).logits if isinstance(x, dict) else loaded(x).logits

    metrics = compare(job, run)
    if job.tokenizer is not None:
        from transformers import AutoTokenizer

        ours = job.tokenizer().encode(SAMPLE_TEXT)
        theirs = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).encode(SAMPLE_TEXT)
        if list(theirs) != list(ours):
            raise RuntimeError(f"{FOLDER}/: the saved tokenizer encodes text differently from the run's "
                               f"({len(theirs)} vs {len(ours)} ids)")
        job.notes.append(f"{FOLDER}/: transformers loads it (AutoModelForCausalLM, AutoTokenizer); the tokenizer "
                         "encodes like the run's")
    metrics["runtime"] = "transformers"
    return metrics


EXPORTERS = {
    "huggingface": Exporter(
        "huggingface", FOLDER, available, export, verify,
        load_snippet=("from transformers import AutoModelForCausalLM, AutoTokenizer; "
                      "model = AutoModelForCausalLM.from_pretrained('huggingface')",
                      "tokenizer = AutoTokenizer.from_pretrained('huggingface')"),
    ),
}
