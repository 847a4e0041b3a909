"""Config of each builtin dataset (no torch). `loader` names the function that builds the splits."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, PositiveInt

from compresspipe.recipe.spec import DataConfig, RecipeDir, RecipeFile


class DigitsData(DataConfig):
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, no download."""

    dataset: Literal["digits"]
    loader: ClassVar[str] = "compresspipe.data.sources:load_digits"
    preprocessing: ClassVar[str] = "8x8 grayscale, pixel values 0..16 divided by 16 (float32 in [0, 1]), NCHW"


class SyntheticData(DataConfig):
    """Random, learnable tensors of any shape: a smoke test for any model, no files needed."""

    dataset: Literal["synthetic"]
    shape: list[PositiveInt] | None = Field(
        None, min_length=1, max_length=4, description="one sample's shape; default: model.input_shape, else [3, 32, 32]"
    )
    num_classes: int = Field(10, ge=2)
    samples: PositiveInt = 512
    noise: float = Field(1.0, ge=0)
    loader: ClassVar[str] = "compresspipe.data.sources:load_synthetic"
    preprocessing: ClassVar[str] = "none (synthetic gaussian data)"


class ImageFolderData(DataConfig):
    """A local folder with one subfolder per class, resized to the model's input_shape."""

    dataset: Literal["imagefolder"]
    path: RecipeDir
    mean: list[float] | None = Field(None, description="per-channel normalisation mean")
    std: list[float] | None = Field(None, description="per-channel normalisation std")
    loader: ClassVar[str] = "compresspipe.data.sources:load_imagefolder"
    preprocessing: ClassVar[str] = ("resize to the input height x width (grayscale when 1 channel), scale to "
                                    "[0, 1] (torchvision ToTensor), then (x - mean) / std when given, NCHW")


class TensorsData(DataConfig):
    """Inputs and labels from a .safetensors or .npz file (never pickled)."""

    dataset: Literal["tensors"]
    path: RecipeFile
    inputs_key: str = "inputs"
    labels_key: str = "labels"
    loader: ClassVar[str] = "compresspipe.data.sources:load_tensors"
    preprocessing: ClassVar[str] = "none: the inputs as stored in the tensors file"
