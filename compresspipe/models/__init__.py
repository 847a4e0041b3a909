"""Model sources: builtin tiny models, torchvision classifiers, checkpoints and entry-point plugins.

The registry maps a model name to a factory ``(**kwargs) -> nn.Module``; builtins are lazy references so
that the recipe layer can check names without importing torch.
"""

from compresspipe.registry import Registry

MODELS: Registry = Registry("model", "compresspipe.models")
MODELS.register("digits-mlp", "compresspipe.models.builtin:digits_mlp")
MODELS.register("digits-cnn", "compresspipe.models.builtin:digits_cnn")
MODELS.register("tiny-resnet", "compresspipe.models.builtin:tiny_resnet")

