"""Dataset sources. The registry maps a dataset name to its pydantic config class (no torch); the
config names the loader that builds the splits."""

from compresspipe.registry import Registry

DATASETS: Registry = Registry("dataset", "compresspipe.datasets")
DATASETS.register("digits", "compresspipe.data.config:DigitsData")
DATASETS.register("synthetic", "compresspipe.data.config:SyntheticData")
DATASETS.register("imagefolder", "compresspipe.data.config:ImageFolderData")
DATASETS.register("tensors", "compresspipe.data.config:TensorsData")
DATASETS.register("synthetic-text", "compresspipe.data.config:SyntheticTextData")
DATASETS.register("text", "compresspipe.data.text:TextData")
