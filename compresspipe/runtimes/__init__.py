"""The runtimes: the files a model ships as (ONNX, int8 and int4 ONNX, ExecuTorch, torch.export, safetensors,
TorchScript, a Hugging Face folder), each written and verified in the runtime that runs it, and the CPU targets
int8 files must be exact on.

One module per format, each with ``EXPORTERS: {format: Exporter}`` (`job.Exporter`: ``available()``,
``export(job, folder)``, ``verify(files, job)``). The export stage and the deploy measurement both build an
`ExportJob` and call them; nothing here imports a stage. What a quantize stage asks of a file arrives typed in
`handoff` (saved with the model). This module, `handoff` and `cpu` import no torch.
"""

from __future__ import annotations

# format -> implementation module (imported only when a file is written)
FORMAT_MODULES: dict[str, str] = {
    "onnx": "compresspipe.runtimes.onnx_float",
    "onnx_int8": "compresspipe.runtimes.onnx_int8",
    "onnx_int4": "compresspipe.runtimes.onnx_int4",
    "executorch": "compresspipe.runtimes.executorch_pte",
    "executorch_int8": "compresspipe.runtimes.executorch_pte",
    "torch_export": "compresspipe.runtimes.torch_export",
    "safetensors": "compresspipe.runtimes.safetensors_copy",
    "torchscript": "compresspipe.runtimes.torchscript",
    "huggingface": "compresspipe.runtimes.hf_folder",
}

__all__ = ["FORMAT_MODULES"]
