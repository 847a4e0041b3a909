"""Builtin dataset loaders and the seeded train/val/calibration split every dataset shares.

A loader is ``fn(config, seed, input_shape)`` named by its config class's ``loader`` ClassVar, so a
plugin dataset plugs in the same way as the builtins. It returns the whole set, either as
``(inputs, labels, num_classes)`` tensors, as ``(dataset, num_classes)``, as a Dataset that has a
``num_classes`` (or ``classes``) attribute, or as `LoadedData` (which can also give real train and validation
splits, class names, input hints and preprocessing); `load_data` then subsets and splits it deterministically.

A sample is ``(x, y)``: x is one tensor, or a dict of named tensors for a model with several inputs (batches
are then dicts, passed to the model as keywords). Everything read from outside is bounded before it is
expanded: a compressed array's size is checked from its header, a folder walk never follows a symlinked folder
and refuses a file reached twice.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from compresspipe.data.config import (
    DigitsData,
    ImageFolderData,
    SyntheticData,
    SyntheticTextData,
    TensorsData,
)
from compresspipe.errors import InputError, RegistryError
from compresspipe.recipe.spec import DataConfig, InputTensor
from compresspipe.registry import import_ref

SPLITS = ("train", "val", "calibration")
DEFAULT_SYNTHETIC_SHAPE = (3, 32, 32)
IGNORE_INDEX = -100  # token targets: positions without a label (padding), as torch's cross-entropy skips them
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}
PER_POSITION_TASKS = ("token_classification", "language_modeling")

# What a builtin loader returns: the whole set as (inputs, labels, num_classes).
Loaded = tuple[torch.Tensor, torch.Tensor, int]


class DictTensorDataset(Dataset):
    """Named input tensors and their labels, sample i being ({name: tensor[i]}, labels[i])."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        n = len(labels)
        if any(len(t) != n for t in inputs.values()):
            raise InputError(f"every input needs one row per label ({n}); got "
                             + ", ".join(f"{k}: {len(t)}" for k, t in inputs.items()))
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: t[i] for k, t in self.inputs.items()}, self.labels[i]

    def select(self, indices: torch.Tensor) -> DictTensorDataset:
        return DictTensorDataset({k: t[indices] for k, t in self.inputs.items()}, self.labels[indices])


@dataclass
class LoadedData:
    """What a loader can return besides plain tensors: the whole set (split by val_fraction) or real splits,
    and what the model's manifest should say about its inputs and outputs."""

    dataset: Dataset | None = None  # the whole set, split by val_fraction
    train: Dataset | None = None  # or real splits
    val: Dataset | None = None
    calibration_source: Dataset | None = None  # the training split without augmentation (default: train)
    num_classes: int | None = None
    classes: list[str] | None = None  # name of each class index
    inputs: list[InputTensor] | None = None  # hints: dynamic axes and value ranges of the inputs
    preprocessing: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)  # per split: file count and the sha256 of the file list
    notes: list[str] = field(default_factory=list)


@dataclass
class DataSplits:
    """The three splits a run uses; each sample is (input tensor or dict of named tensors, label)."""

    train: Dataset
    val: Dataset
    calibration: Dataset  # a deterministic subset of the train split
    num_classes: int
    input_shape: tuple[int, ...]  # one sample's shape (of the first input)
    inputs: list[InputTensor] = field(default_factory=list)  # every input: name, shape, dtype, dynamic axes
    classes: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = [InputTensor(name="input", shape=list(self.input_shape))]

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A single-process loader; shuffling draws from a generator seeded with `seed` (pass seed+epoch)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            getattr(self, split), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
        )

    def fingerprint(self) -> str:
        """sha256 over every split's samples (image files: their bytes), so a resumed run can tell that its
        inputs changed."""
        digest = hashlib.sha256()
        digest.update(f"classes={self.num_classes};shape={self.input_shape}".encode())
        for split in SPLITS:
            digest.update(f";{split}:".encode())
            _hash_dataset(digest, getattr(self, split))
        return digest.hexdigest()


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _hash_item(digest: Any, item: Any) -> None:
    if isinstance(item, dict):
        for k in sorted(item):
            digest.update(k.encode())
            _hash_item(digest, item[k])
    else:
        _hash_tensor(digest, torch.as_tensor(item))


def _hash_dataset(digest: Any, dataset: Dataset) -> None:
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            _hash_tensor(digest, t)
        return
    if isinstance(dataset, DictTensorDataset):
        _hash_item(digest, dataset.inputs)
        _hash_tensor(digest, dataset.labels)
        return
    if hasattr(dataset, "fingerprint"):
        dataset.fingerprint(digest)
        return
    for i in range(len(dataset)):  # type: ignore[arg-type]
        for item in dataset[i]:
            _hash_item(digest, item)


def load_data(config: DataConfig, seed: int, input_shape: tuple[int, ...] | None = None,
              task: str = "classification") -> DataSplits:
    """Load the dataset the config names, cap it at max_samples, split it with a seeded permutation (or keep
    the real splits a loader gives), and check its labels and inputs for the task."""
    ref = type(config).loader
    try:
        fn = import_ref(ref)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(
            f"dataset {config.dataset!r}: cannot import its loader {ref!r} ({type(exc).__name__}: {exc})"
        ) from None
    loaded = _as_loaded(config.dataset, fn(config, seed, input_shape))
    generator = torch.Generator().manual_seed(seed)
    if loaded.dataset is not None:
        dataset = loaded.dataset
        n = len(dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=generator)
        if config.max_samples is not None:
            order = order[: config.max_samples]
        m = len(order)
        if m < 2:
            raise InputError(
                f"dataset {config.dataset!r} has {m} sample{'s' if m != 1 else ''}; "
                "at least 2 are needed to split train and validation"
            )
        n_val = min(max(1, round(m * config.val_fraction)), m - 1)
        val_idx, train_idx = order[:n_val], order[n_val:]
        train, val = _subset(dataset, train_idx), _subset(dataset, val_idx)
        calibration = _subset(dataset, train_idx[: min(config.calibration_samples, len(train_idx))])
    else:
        assert loaded.train is not None and loaded.val is not None  # noqa: S101 - _as_loaded guarantees it
        train, val = _cap(loaded.train, config.max_samples, generator), _cap(loaded.val, config.max_samples, generator)
        if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
            raise InputError(f"dataset {config.dataset!r}: the training and the validation split need at least "
                             f"one sample each (got {len(train)} and {len(val)})")  # type: ignore[arg-type]
        source = loaded.calibration_source if loaded.calibration_source is not None else loaded.train
        source = _cap(source, config.max_samples, torch.Generator().manual_seed(seed))  # the same rows as train
        pick = torch.randperm(len(source), generator=generator)[: config.calibration_samples]  # type: ignore[arg-type]
        calibration = _subset(source, pick.sort().values)

    first_input = val[0][0]
    inputs = _input_spec(config.dataset, first_input, loaded.inputs)
    labels = [_labels(split) for split in (train, val)]
    num_classes = _check_labels(config.dataset, task, labels, loaded.num_classes)
    if loaded.classes is not None and task not in ("regression", "language_modeling") \
            and len(loaded.classes) != num_classes:
        raise InputError(f"dataset {config.dataset!r} names {len(loaded.classes)} classes but its labels need "
                         f"{num_classes}")
    return DataSplits(train=train, val=val, calibration=calibration, num_classes=num_classes,
                      input_shape=tuple(inputs[0].shape), inputs=inputs, classes=loaded.classes,
                      preprocessing=loaded.preprocessing, files=loaded.files, notes=loaded.notes)


def _cap(dataset: Dataset, limit: int | None, generator: torch.Generator) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or n <= limit:
        return dataset
    return _subset(dataset, torch.randperm(n, generator=generator)[:limit].sort().values)


def _as_loaded(name: str, result: Any) -> LoadedData:
    """Normalise what a loader returned."""
    if isinstance(result, LoadedData):
        if result.dataset is None and (result.train is None or result.val is None):
            raise InputError(f"dataset {name!r}: its loader gave neither the whole set nor train and val splits")
        return result
    if isinstance(result, tuple) and len(result) == 3:
        inputs, labels, num_classes = result
        inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
        return LoadedData(dataset=TensorDataset(inputs, labels), num_classes=int(num_classes))
    if isinstance(result, tuple) and len(result) == 2:
        dataset, num_classes = result
        return LoadedData(dataset=dataset, num_classes=int(num_classes))
    if isinstance(result, Dataset):
        if hasattr(result, "num_classes"):
            return LoadedData(dataset=result, num_classes=int(result.num_classes))
        if hasattr(result, "classes"):
            return LoadedData(dataset=result, num_classes=len(result.classes), classes=[str(c) for c in result.classes])
    raise InputError(
        f"dataset {name!r}: its loader returned {type(result).__name__}; a loader must return "
        "(inputs, labels, num_classes), (dataset, num_classes), a Dataset with a num_classes attribute, or LoadedData"
    )


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """Index tensors directly when we can: the split stays a tensor set and is cheap to fingerprint."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    if hasattr(dataset, "select"):
        return dataset.select(indices)  # type: ignore[no-any-return]
    return Subset(dataset, indices.tolist())


def _input_spec(name: str, sample: Any, hints: list[InputTensor] | None) -> list[InputTensor]:
    """The inputs a sample holds (one tensor is the input called `input`), with the loader's hints (dynamic
    axes, value ranges) where the names match."""
    items = sample.items() if isinstance(sample, dict) else [("input", sample)]
    known = {h.name: h for h in hints or []}
    out = []
    for key, value in items:
        t = torch.as_tensor(value)
        dtype = TORCH_DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise InputError(f"dataset {name!r}: input {key!r} has dtype {t.dtype}; use float32/16/64, bfloat16, "
                             "int64, int32 or bool")
        if t.dim() == 0:
            raise InputError(f"dataset {name!r}: input {key!r} is a scalar per sample; give it a shape, e.g. [1]")
        hint = known.get(str(key))
        try:
            out.append(InputTensor(name=str(key), shape=list(t.shape), dtype=dtype,  # type: ignore[arg-type]
                                   dynamic=dict(hint.dynamic) if hint else {},
                                   range=hint.range if hint and dtype in ("int64", "int32") else None))
        except ValueError as exc:
            raise InputError(f"dataset {name!r}: input {key!r}: {exc}") from None
    return out


def _labels(dataset: Dataset) -> torch.Tensor | None:
    """Every label of a split without loading its inputs where possible; None for an empty split."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[-1]
    if isinstance(dataset, DictTensorDataset):
        return dataset.labels
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets)
    if isinstance(dataset, Subset):
        parent = _labels(dataset.dataset)
        if parent is not None:
            return parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return None
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(n)])


def _check_labels(name: str, task: str, splits: list[torch.Tensor | None], given: int | None) -> int:
    """The labels suit the task (integer classes, per-position ids, or float targets); returns the number of
    classes (outputs per sample or position; regression: targets per sample)."""
    present = [t for t in splits if t is not None and t.numel() > 0]
    if not present:
        raise InputError(f"dataset {name!r} has no labels")
    for t in present:
        if t.dtype == torch.bool or t.is_complex():
            raise InputError(f"dataset {name!r}: labels of dtype {t.dtype} cannot be targets")
    if task == "regression":
        bad = sum(int((~torch.isfinite(t.float())).sum()) for t in present)
        if bad:
            raise InputError(f"dataset {name!r}: {bad} regression target(s) are NaN or Inf")
        return int(math.prod(present[0].shape[1:])) if present[0].dim() > 1 else 1
    if any(t.is_floating_point() for t in present):
        raise InputError(f"dataset {name!r}: labels must hold integer class ids for task {task} (got "
                         f"{next(t.dtype for t in present if t.is_floating_point())}); float targets need "
                         "task: regression")
    per_position = task in PER_POSITION_TASKS
    if not per_position and any(t.dim() != 1 for t in present):
        raise InputError(f"dataset {name!r}: task {task} needs one class id per sample (labels of shape "
                         f"[samples]); got {list(present[0].shape)}. Per-token labels need task: token_classification")
    low = min(int(t[t != IGNORE_INDEX].min()) if per_position and (t != IGNORE_INDEX).any() else int(t.min())
              for t in present)
    high = max(int(t.max()) for t in present)
    if low < 0:
        raise InputError(f"dataset {name!r}: labels hold negative class ids (min {low})"
                         + (f"; only {IGNORE_INDEX} marks a position without a label" if per_position else ""))
    if given is not None and high >= given:
        raise InputError(f"dataset {name!r}: labels go up to {high}, but the dataset has {given} classes")
    return given if given is not None else high + 1


# --- builtin loaders -------------------------------------------------------------------------------


def load_digits(config: DigitsData, seed: int, input_shape: tuple[int, ...] | None = None) -> Loaded | LoadedData:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], as (N, 1, 8, 8); with `size` and `channels`,
    upsampled (bilinear, corners aligned) and the gray channel repeated, as (N, channels, size, size)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    inputs = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if config.size == 8 and config.channels == 1:
        return inputs, labels, 10
    if config.size != 8:
        inputs = torch.nn.functional.interpolate(inputs, size=(config.size, config.size), mode="bilinear",
                                                 align_corners=True).clamp(0.0, 1.0)
    inputs = inputs.expand(-1, config.channels, -1, -1).contiguous()
    description = (f"8x8 grayscale, pixel values 0..16 divided by 16 (float32 in [0, 1]), upsampled to "
                   f"{config.size}x{config.size} (bilinear, corners aligned)"
                   + (f", the gray channel repeated {config.channels} times" if config.channels > 1 else "") + ", NCHW")
    prep = {"description": description, "resize": [config.size, config.size], "interpolation": "bilinear",
            "channels": config.channels}
    return LoadedData(dataset=TensorDataset(inputs, labels), num_classes=10, preprocessing=prep)


def load_synthetic(config: SyntheticData, seed: int, input_shape: tuple[int, ...] | None = None) -> Loaded:
    """Fixed random class prototypes plus gaussian noise: learnable, so training stages can be tested.

    Samples take the config's shape if it gives one, else the model's input_shape (else 3x32x32); the executor
    reports a mismatch between the two.
    """
    shape = tuple(config.shape) if config.shape else tuple(input_shape or DEFAULT_SYNTHETIC_SHAPE)
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn((config.num_classes, *shape), generator=generator)
    labels = torch.arange(config.samples, dtype=torch.int64) % config.num_classes
    labels = labels[torch.randperm(config.samples, generator=generator)]
    noise = torch.randn((config.samples, *shape), generator=generator) * config.noise
    inputs = (prototypes[labels] + noise).to(torch.float32)
    return inputs, labels, int(config.num_classes)


def load_synthetic_text(config: SyntheticTextData, seed: int,
                        input_shape: tuple[int, ...] | None = None) -> LoadedData:
    """A learnable token task from the seed: input_ids, attention_mask (lengths from half to all of seq_len)."""
    g = torch.Generator().manual_seed(seed)
    n, length, vocab, classes = config.samples, config.seq_len, config.vocab_size, config.num_classes
    target = config.target or "sequence"
    lengths = torch.randint(max(2, length // 2), length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab, (n, length), generator=g)
    noisy = torch.rand(n, generator=g) < config.noise
    labels: torch.Tensor
    num_classes = classes
    if target == "sequence":
        per_class = max(1, min(8, (vocab - 1) // (2 * classes)))
        keywords = (torch.randperm(vocab - 1, generator=g)[: per_class * classes] + 1).view(classes, per_class)
        labels = torch.randint(0, classes, (n,), generator=g)
        for _ in range(config.keywords):  # keyword tokens of the sample's class at random positions
            pos = (torch.rand(n, generator=g) * lengths).long()
            ids[torch.arange(n), pos] = keywords[labels, torch.randint(0, per_class, (n,), generator=g)]
        labels = torch.where(noisy, torch.randint(0, classes, (n,), generator=g), labels)
    elif target == "token":
        table = torch.randint(0, classes, (vocab,), generator=g)
        labels = table[ids]
        flip = torch.rand(n, length, generator=g) < config.noise
        labels = torch.where(flip, torch.randint(0, classes, (n, length), generator=g), labels)
    elif target == "next_token":
        successor = torch.randperm(vocab - 1, generator=g) + 1  # token t -> successor[t - 1], never padding
        follow = torch.rand(n, length, generator=g) >= config.noise
        for t in range(1, length):
            ids[:, t] = torch.where(follow[:, t], successor[ids[:, t - 1] - 1], ids[:, t])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, :-1] = ids[:, 1:]
        has_next = torch.cat([mask[:, 1:], torch.zeros(n, 1, dtype=torch.bool)], dim=1)
        labels = labels.masked_fill(~has_next, IGNORE_INDEX)
        num_classes = vocab
    else:  # regression: the mean of fixed per-token values over the sequence
        values = torch.randn(vocab, generator=g)
        labels = ((values[ids] * mask).sum(1) / lengths).unsqueeze(1).float()
        num_classes = 1
    ids = ids.masked_fill(~mask, 0)
    if target == "token":
        labels = labels.masked_fill(~mask, IGNORE_INDEX)
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    hints = [InputTensor(name="input_ids", shape=[length], dtype="int64", dynamic={0: "sequence"}, range=(0, vocab)),
             InputTensor(name="attention_mask", shape=[length], dtype="int64", dynamic={0: "sequence"}, range=(0, 2))]
    return LoadedData(dataset=DictTensorDataset(inputs, labels),
                      num_classes=None if target == "regression" else num_classes, inputs=hints,
                      preprocessing={"description": config.preprocessing, "vocab_size": vocab, "seq_len": length})


# --- image folders -----------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Images read from disk when a batch needs them (never all held in memory)."""

    def __init__(self, files: list[Path], labels: list[int], root: Path, transform: Callable[[Any], torch.Tensor],
                 channels: int, augment: Any = None):
        self.files, self.labels, self.root = list(files), list(labels), root
        self.transform, self.channels, self.augment = transform, channels, augment

    @property
    def targets(self) -> list[int]:
        return self.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as image:
                x = self.transform(image.convert("L" if self.channels == 1 else "RGB"))
        except Exception as exc:  # PIL raises many types for a bad file; name the file instead
            raise OSError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        if self.augment is not None:
            x = _augment(x, self.augment)
        return x, torch.tensor(self.labels[i], dtype=torch.int64)

    def select(self, indices: torch.Tensor) -> ImageFiles:
        idx = [int(i) for i in indices]
        return ImageFiles([self.files[i] for i in idx], [self.labels[i] for i in idx], self.root, self.transform,
                          self.channels, self.augment)

    def without_augmentation(self) -> ImageFiles:
        return ImageFiles(self.files, self.labels, self.root, self.transform, self.channels, None)

    def fingerprint(self, digest: Any) -> None:
        for path, label in zip(self.files, self.labels, strict=True):
            digest.update(f"{self._name(path)}={label}:".encode())
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)

    def file_list(self) -> dict[str, Any]:
        """What the lock file records: the number of files and the sha256 of (relative path, label) lines."""
        lines = "".join(f"{self._name(p)}\t{label}\n" for p, label in zip(self.files, self.labels, strict=True))
        return {"root": str(self.root), "files": len(self.files), "sha256": hashlib.sha256(lines.encode()).hexdigest()}

    def _name(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def _augment(x: torch.Tensor, augment: Any) -> torch.Tensor:
    """Light augmentation of one training image, drawn from torch's global generator (seeded per stage)."""
    if augment.hflip and bool(torch.rand(()) < 0.5):
        x = x.flip(-1)
    pad = augment.crop_padding
    if pad:
        h, w = x.shape[-2:]
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        x = padded[..., top:top + h, left:left + w]
    return x


def scan_images(root: Path, classes: list[str] | None, max_files: int,
                known: dict[Path, str] | None = None) -> tuple[list[Path], list[int], list[str], list[str]]:
    """(files, labels, class names, notes) of a class-per-subfolder tree, walked safely: symlinked folders are
    never followed (a link to `..` cannot loop or copy images across classes), a file reached twice (a symlink,
    or the same file in another class or split, named in `known`) is an error, and the walk stops at
    `max_files`."""
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    try:
        found = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
    except OSError as exc:
        raise InputError(f"{root}: cannot list ({exc})") from None
    names = list(classes) if classes is not None else found
    if not names:
        raise InputError(f"{root}: not a usable image folder (no class subfolders); it needs one subfolder per "
                         "class holding images")
    missing = [c for c in names if c not in found]
    if missing and classes is not None and known is None:
        raise InputError(f"{root}: classes names folder(s) {', '.join(missing)}, which are not subfolders here "
                         f"(found: {', '.join(found) or 'none'})")
    extra = [c for c in found if c not in names]
    if extra and known is not None:
        raise InputError(f"{root}: class folder(s) {', '.join(extra)} are not among the training classes "
                         f"({', '.join(names)})")
    seen: dict[Path, str] = dict(known or {})
    files: list[Path] = []
    labels: list[int] = []
    notes: list[str] = []
    skipped_links = 0
    empty: list[str] = []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        before = len(files)
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            here = Path(dirpath)
            kept = []
            for d in sorted(dirnames):
                if (here / d).is_symlink():
                    skipped_links += 1
                else:
                    kept.append(d)
            dirnames[:] = kept
            for fname in sorted(filenames):
                if not fname.lower().endswith(IMAGE_SUFFIXES):
                    continue
                path = here / fname
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise InputError(f"{path}: a broken or looping symlink") from None
                if real in seen:
                    raise InputError(f"{path} is the same file as {seen[real]}: an image may appear once (in one "
                                     "class of one split); a copy in two classes or in both splits would be "
                                     "trained and validated on")
                seen[real] = str(path)
                files.append(path)
                labels.append(label)
                if len(files) > max_files:
                    raise InputError(f"{root}: more than {max_files} image files (data.max_files)")
        if len(files) == before:
            empty.append(name)
    if empty:  # a class no sample belongs to would shift nothing visibly, yet the model learns a class never seen
        raise InputError(f"{root}: class folder(s) {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} hold no "
                         f"images (suffixes {', '.join(IMAGE_SUFFIXES)}); remove them, or give data.classes without "
                         "them")
    if skipped_links:
        notes.append(f"{root}: {skipped_links} symlinked folder(s) not followed")
    if not files:
        raise InputError(f"{root}: not a usable image folder (no images with suffix {', '.join(IMAGE_SUFFIXES)}); "
                         "it needs one subfolder per class holding images")
    return files, labels, names, notes


DECODE_ALL = 5000  # folders up to this many images are decoded whole before any stage runs


def _check_headers(files: list[Path]) -> None:
    """Every image is checked before any stage runs, so a bad file is exit 2 naming it, not a failure mid-training:
    decoded whole when the folder is small (a truncated file fails only when its pixels are read); in larger
    folders every header is read and verified (PIL's verify checks the structure, e.g. PNG chunk checksums) and
    every 50th image is decoded whole."""
    from PIL import Image

    small = len(files) <= DECODE_ALL
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                if small or i % 50 == 0:
                    image.load()
                else:
                    image.verify()
        except Exception as exc:  # PIL raises many types for a bad file; name the file instead
            raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); remove or replace it"
                             ) from None


def load_imagefolder(config: ImageFolderData, seed: int, input_shape: tuple[int, ...] | None = None) -> LoadedData:
    """Class-per-subfolder trees streamed from disk: the real train/val folders, or one folder split by
    val_fraction here (so that only the training files are augmented)."""
    from torchvision import transforms

    root = Path(config.train_path or config.path or ".")
    if input_shape is None:
        raise InputError(f"{root}: imagefolder needs model.input_shape, e.g. [3, 64, 64]")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(
            f"{root}: imagefolder needs model.input_shape as [channels, height, width] with 1 or 3 "
            f"channels (got {list(input_shape)})"
        )
    channels, height, width = (int(s) for s in input_shape)
    size = tuple(config.resize) if config.resize else (height, width)
    if size != (height, width):
        raise InputError(f"data.resize {list(size)} differs from the model's input height and width "
                         f"{[height, width]}; images must arrive at the size the model takes")
    steps: list[Any] = [transforms.Resize(size, interpolation=getattr(
        transforms.InterpolationMode, config.interpolation.upper())), transforms.ToTensor()]
    if config.mean is not None and config.std is not None:
        if not len(config.mean) == len(config.std) == channels:
            raise InputError(
                f"data.mean and data.std must both list one value per channel ({channels}) "
                f"(got mean={config.mean}, std={config.std})"
            )
        steps.append(transforms.Normalize(config.mean, config.std))
    transform = transforms.Compose(steps)

    files, labels, classes, notes = scan_images(root, config.classes, config.max_files)
    train_idx: list[int]
    val_idx: list[int]
    if config.val_path is not None:
        seen = {p.resolve(): str(p) for p in files}
        vfiles, vlabels, _, vnotes = scan_images(Path(config.val_path), classes, config.max_files, known=seen)
        notes += vnotes
        train_set = ImageFiles(files, labels, root, transform, channels, config.augment)
        val_set = ImageFiles(vfiles, vlabels, Path(config.val_path), transform, channels)
    else:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(max(1, round(len(files) * config.val_fraction)), len(files) - 1) if len(files) > 1 else 0
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        every = ImageFiles(files, labels, root, transform, channels, config.augment)
        train_set = every.select(torch.tensor(train_idx, dtype=torch.long))
        val_set = every.select(torch.tensor(val_idx, dtype=torch.long)).without_augmentation()
        notes.append(f"{root}: validation is a seeded val_fraction ({config.val_fraction}) of the folder; give "
                     "train_path and val_path for a real held-out split")
    _check_headers(train_set.files + val_set.files)
    augmenting = config.augment.hflip or config.augment.crop_padding
    preprocessing = {"description": config.preprocessing, "resize": list(size), "interpolation": config.interpolation,
                     "color": "grayscale" if channels == 1 else "rgb", "scale": "1/255",
                     "mean": config.mean, "std": config.std}
    return LoadedData(train=train_set, val=val_set,
                      calibration_source=train_set.without_augmentation() if augmenting else None,
                      num_classes=len(classes), classes=classes, preprocessing=preprocessing,
                      files={"train": train_set.file_list(), "val": val_set.file_list()}, notes=notes)


# --- tensor files ------------------------------------------------------------------------------------


def load_tensors(config: TensorsData, seed: int, input_shape: tuple[int, ...] | None = None) -> LoadedData:
    """Inputs and labels from a .safetensors or .npz file, read without unpickling, bounded before expanding."""
    path = Path(config.path)
    arrays = _read_tensor_file(path, config.max_bytes)
    names = list(config.inputs) if config.inputs is not None else [config.inputs_key]
    for key in (*names, config.labels_key):
        if key not in arrays:
            raise InputError(
                f"{path}: no key {key!r}; keys present: {', '.join(sorted(arrays)) or '(none)'} "
                "(set data.inputs_key or data.inputs / data.labels_key)"
            )
    labels = arrays[config.labels_key]
    tensors: dict[str, torch.Tensor] = {}
    for key in names:
        t = arrays[key]
        if t.dtype == torch.bool:
            t = t.to(torch.int64)
        if t.is_complex():
            raise InputError(f"{path}: {key!r} must be real numbers (got {t.dtype})")
        if t.dim() < 2 or t.shape[0] == 0:
            raise InputError(f"{path}: {key!r} must have shape (samples, ...) with at least one sample "
                             f"(got {tuple(t.shape)})")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise InputError(f"{path}: {key!r} holds {bad} NaN or Inf value(s); clean the data first")
            t = t.to(torch.float32)
        else:
            t = t.to(torch.int64)
        tensors[key] = t
    n = next(iter(tensors.values())).shape[0]
    if any(t.shape[0] != n for t in tensors.values()):
        raise InputError(f"{path}: the inputs have different numbers of samples: "
                         + ", ".join(f"{k}: {t.shape[0]}" for k, t in tensors.items()))
    if labels.dtype == torch.bool or labels.is_complex():
        raise InputError(f"{path}: {config.labels_key!r} must hold integer class ids or float targets "
                         f"(got {labels.dtype})")
    if labels.dim() == 0 or labels.shape[0] != n:
        raise InputError(
            f"{path}: {config.labels_key!r} must have one label per input "
            f"(got shape {tuple(labels.shape)} for {n} inputs)"
        )
    labels = labels.to(torch.float32) if labels.is_floating_point() else labels.to(torch.int64)
    if config.inputs is None:
        return LoadedData(dataset=TensorDataset(tensors[config.inputs_key], labels))
    return LoadedData(dataset=DictTensorDataset(tensors, labels))


def _read_tensor_file(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as fh:
                total = 0
                for key in fh.keys():  # noqa: SIM118 (not a dict)
                    sl = fh.get_slice(key)
                    total += math.prod(sl.get_shape()) * _dtype_size(str(sl.get_dtype()))
            _bound(path, total, max_bytes)
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read safetensors file ({exc})") from None
    if suffix == ".npz":
        return _read_npz(path, max_bytes)
    raise InputError(f"{path}: tensor data must be .safetensors or .npz (got {suffix or 'no extension'})")


def _dtype_size(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def _bound(path: Path, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise InputError(f"{path}: its arrays expand to {total} bytes, more than data.max_bytes ({max_bytes}); "
                         "raise the limit if the data is meant to be this large")


def _read_npz(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    """An .npz (a zip of .npy files) read without unpickling; each member's size is checked from its .npy header
    and its zip entry before a byte of it is expanded."""
    import numpy as np
    from numpy.lib import format as npy

    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file (an .npz is a zip of .npy arrays; this file is not a zip)")
    out: dict[str, torch.Tensor] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if not i.is_dir()]
            declared = sum(i.file_size for i in members)
            _bound(path, declared, max_bytes)
            expanded = 0
            for info in members:
                if not info.filename.endswith(".npy"):
                    raise InputError(f"{path}: member {info.filename!r} is not an .npy array")
                with archive.open(info) as fh:
                    version = npy.read_magic(fh)
                    if version == (1, 0):
                        shape, fortran, dtype = npy.read_array_header_1_0(fh)
                    elif version in ((2, 0), (3, 0)):
                        shape, fortran, dtype = npy.read_array_header_2_0(fh)
                    else:
                        raise ValueError(f"unknown .npy version {version}")
                if dtype.hasobject:
                    raise InputError(f"{path}: {info.filename!r} holds Python objects; cannot read .npz without "
                                     "unpickling, and compresspipe never unpickles; save plain numeric arrays")
                size = math.prod(shape) * dtype.itemsize
                if size > info.file_size:
                    raise InputError(f"{path}: {info.filename!r} declares {size} bytes of data in a "
                                     f"{info.file_size}-byte member: the file is corrupt or crafted")
                expanded += size
                _bound(path, expanded, max_bytes)
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    out[key] = torch.from_numpy(np.ascontiguousarray(npz[key]))
    except InputError:
        raise
    except (ValueError, OSError, TypeError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: cannot read .npz without unpickling ({exc}); save plain numeric arrays") from None
    return out


__all__ = ["DataSplits", "DictTensorDataset", "LoadedData", "load_data", "load_digits", "load_imagefolder",
           "load_synthetic", "load_synthetic_text", "load_tensors"]
