"""Stage registry. A stage kind is a pydantic config class (no torch) naming its implementation.

Adding a builtin stage is one line here; a plugin adds an entry point in group ``compresspipe.stages``
whose name is the stage type and whose value is the config class.
"""

from compresspipe.registry import Registry

STAGES: Registry = Registry("stage", "compresspipe.stages")
STAGES.register("train", "compresspipe.stages.train:TrainConfig")
STAGES.register("distill", "compresspipe.stages.distill:DistillConfig")
STAGES.register("prune", "compresspipe.stages.prune:PruneConfig")
STAGES.register("export", "compresspipe.stages.export:ExportConfig")
STAGES.register("quantize", "compresspipe.stages.quantize:QuantizeConfig")
STAGES.register("factorize", "compresspipe.stages.factorize:FactorizeConfig")
STAGES.register("fold_bn", "compresspipe.stages.fold_bn:FoldBatchNormConfig")
