"""Config of each builtin dataset (no torch). `loader` names the function that builds the splits."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PositiveInt, model_validator

from compresspipe.recipe.spec import IDENTIFIER, DataConfig, RecipeDir, RecipeFile, StrictModel

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class DigitsData(DataConfig):
    """scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, no download."""

    dataset: Literal["digits"]
    size: int = Field(8, ge=8, le=224, description="side of the images: 8 as bundled, or upsampled (bilinear) for "
                                                   "models that need larger inputs (a MobileNet at 32)")
    channels: Literal[1, 3] = Field(1, description="1 as bundled, or 3 (the gray channel repeated) for RGB models")
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


TextTarget = Literal["sequence", "token", "next_token", "regression"]
# the target a task trains on, when data.target is not given
TASK_TARGETS: dict[str, TextTarget] = {"classification": "sequence", "sequence_classification": "sequence",
                                       "token_classification": "token", "language_modeling": "next_token",
                                       "regression": "regression"}


class SyntheticTextData(DataConfig):
    """A learnable token task generated from the seed (no download): input_ids and attention_mask of variable
    length. sequence: each class has keyword tokens, and a sequence's label is the class whose keywords it holds
    most; token: each token id has a fixed class; next_token: a fixed successor table, followed most of the time;
    regression: the mean of fixed per-token values."""

    dataset: Literal["synthetic-text"]
    vocab_size: int = Field(1000, ge=16, le=2**20, description="token ids are 0..vocab_size-1 (0 is padding)")
    seq_len: int = Field(64, ge=4, le=65536, description="tokens per sample (padded; lengths vary from half of it)")
    num_classes: int = Field(2, ge=2, le=4096, description="classes of sequence and token targets")
    samples: PositiveInt = 2048
    target: TextTarget | None = Field(
        None, description="sequence | token | next_token | regression; default: what the recipe's task trains on"
    )
    keywords: int = Field(4, ge=1, le=64, description="sequence target: keyword tokens per sequence")
    noise: float = Field(0.1, ge=0, le=1, description="share of labels/successors drawn at random")
    loader: ClassVar[str] = "compresspipe.data.sources:load_synthetic_text"
    preprocessing: ClassVar[str] = "token ids (int64, 0 = padding) and an attention mask (1 = token, 0 = padding)"


Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]


class Augment(StrictModel):
    """Light training-split augmentation (validation and calibration images are never augmented)."""

    hflip: bool = Field(False, description="flip half the training images left-right")
    crop_padding: int = Field(0, ge=0, le=64, description="pad by this many pixels, then crop back at random")


class ImageFolderData(DataConfig):
    """Local folders with one subfolder per class. `train_path` and `val_path` are the real splits; `path` (or
    `train_path` alone) is split by `val_fraction`. Images are read from disk as batches need them."""

    dataset: Literal["imagefolder"]
    path: RecipeDir | None = Field(None, description="one folder of class subfolders, split by val_fraction")
    train_path: RecipeDir | None = Field(None, description="the training split's folder of class subfolders")
    val_path: RecipeDir | None = Field(None, description="the validation split's folder (same class names)")
    classes: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        None, min_length=1, description="class folder names in output order (default: every subfolder, sorted)"
    )
    mean: list[FiniteFloat] | None = Field(None, description="per-channel normalisation mean")
    std: list[PositiveFinite] | None = Field(None, description="per-channel normalisation std (> 0)")
    resize: list[PositiveInt] | None = Field(
        None, min_length=2, max_length=2, description="[height, width] images are resized to; default: the "
                                                      "model's input height and width"
    )
    interpolation: Interpolation = Field("bilinear", description="resampling filter of the resize")
    augment: Augment = Field(default_factory=lambda: Augment(), description="training-split augmentation")
    max_files: PositiveInt = Field(1_000_000, description="refuse folders holding more image files than this")
    loader: ClassVar[str] = "compresspipe.data.sources:load_imagefolder"
    preprocessing: ClassVar[str] = ("resize to data.resize (default the input height x width) with "
                                    "data.interpolation (grayscale when 1 channel), scale to [0, 1] "
                                    "(torchvision ToTensor), then (x - mean) / std when given, NCHW")

    @model_validator(mode="after")
    def _one_layout(self) -> ImageFolderData:
        if (self.path is None) == (self.train_path is None):
            raise ValueError("give path (one folder, split by val_fraction) or train_path (with val_path for a "
                             "real validation split)")
        if self.val_path is not None and self.train_path is None:
            raise ValueError("val_path needs train_path")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and self.std is not None
                                                          and len(self.mean) != len(self.std)):
            raise ValueError("mean and std go together, one value per channel each")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes lists a name twice")
        return self


class TensorsData(DataConfig):
    """Inputs and labels from a .safetensors or .npz file (never pickled). `inputs` names several arrays for a
    model with several named inputs (e.g. input_ids and attention_mask)."""

    dataset: Literal["tensors"]
    path: RecipeFile
    inputs_key: str = Field("inputs", description="the array of inputs (one input called 'input')")
    inputs: list[Annotated[str, Field(pattern=IDENTIFIER)]] | None = Field(
        None, min_length=1, max_length=16, description="several inputs: array names, each an argument name of the "
                                                       "model's forward (instead of inputs_key)"
    )
    labels_key: str = "labels"
    max_bytes: PositiveInt = Field(
        2 * 2**30, description="refuse files whose arrays expand to more than this many bytes (compressed .npz "
                               "members are checked before they are read)"
    )
    loader: ClassVar[str] = "compresspipe.data.sources:load_tensors"
    preprocessing: ClassVar[str] = "none: the inputs as stored in the tensors file"

    @model_validator(mode="after")
    def _keys(self) -> TensorsData:
        if self.inputs is not None and self.labels_key in self.inputs:
            raise ValueError(f"labels_key {self.labels_key!r} is also listed in inputs")
        return self


def text_target(config: Any, task: str) -> Any:
    """A synthetic-text config with its target filled in from the task (other configs unchanged)."""
    if isinstance(config, SyntheticTextData) and config.target is None:
        return config.model_copy(update={"target": TASK_TARGETS[task]})
    return config
