"""Builtin dataset loaders and the seeded train/val/calibration split every dataset shares.

A loader is ``fn(config, seed, input_shape)`` named by its config class's ``loader`` ClassVar, so a
plugin dataset plugs in the same way as the builtins. It returns the whole set, either as
``(inputs, labels, num_classes)`` tensors, as ``(dataset, num_classes)``, or as a Dataset that has a
``num_classes`` (or ``classes``) attribute; `load_data` then subsets and splits it deterministically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from compresspipe.data.config import ImageFolderData, SyntheticData, TensorsData
from compresspipe.errors import InputError, RegistryError
from compresspipe.recipe.spec import DataConfig
from compresspipe.registry import import_ref

SPLITS = ("train", "val", "calibration")
DEFAULT_SYNTHETIC_SHAPE = (3, 32, 32)

# What a builtin loader returns: the whole set as (inputs, labels, num_classes).
Loaded = tuple[torch.Tensor, torch.Tensor, int]


@dataclass
class DataSplits:
    """The three splits a run uses; each sample is (float32 input, int64 scalar label)."""

    train: Dataset
    val: Dataset
    calibration: Dataset  # a deterministic subset of the train split
    num_classes: int
    input_shape: tuple[int, ...]  # one sample's shape

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A single-process loader; shuffling draws from a generator seeded with `seed` (pass seed+epoch)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            getattr(self, split), batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
        )

    def fingerprint(self) -> str:
        """sha256 over every split's tensors, so a resumed run can tell that its inputs changed."""
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


def _hash_dataset(digest: Any, dataset: Dataset) -> None:
    if isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            _hash_tensor(digest, t)
        return
    for i in range(len(dataset)):  # type: ignore[arg-type]
        for item in dataset[i]:
            _hash_tensor(digest, torch.as_tensor(item))


def load_data(config: DataConfig, seed: int, input_shape: tuple[int, ...] | None = None) -> DataSplits:
    """Load the dataset the config names, cap it at max_samples, and split it with a seeded permutation."""
    ref = type(config).loader
    try:
        fn = import_ref(ref)
    except (ImportError, AttributeError) as exc:
        raise RegistryError(
            f"dataset {config.dataset!r}: cannot import its loader {ref!r} ({type(exc).__name__}: {exc})"
        ) from None
    dataset, num_classes = _as_dataset(config.dataset, fn(config, seed, input_shape))

    n = len(dataset)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
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
    calib_idx = train_idx[: min(config.calibration_samples, len(train_idx))]

    first_input = dataset[0][0]
    return DataSplits(
        train=_subset(dataset, train_idx),
        val=_subset(dataset, val_idx),
        calibration=_subset(dataset, calib_idx),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in first_input.shape),
    )


def _as_dataset(name: str, result: Any) -> tuple[Dataset, int]:
    """Normalise what a loader returned into (dataset, num_classes)."""
    if isinstance(result, tuple) and len(result) == 3:
        inputs, labels, num_classes = result
        return TensorDataset(torch.as_tensor(inputs), torch.as_tensor(labels)), int(num_classes)
    if isinstance(result, tuple) and len(result) == 2:
        dataset, num_classes = result
        return dataset, int(num_classes)
    if isinstance(result, Dataset):
        if hasattr(result, "num_classes"):
            return result, int(result.num_classes)
        if hasattr(result, "classes"):
            return result, len(result.classes)
    raise InputError(
        f"dataset {name!r}: its loader returned {type(result).__name__}; a loader must return "
        "(inputs, labels, num_classes), (dataset, num_classes), or a Dataset with a num_classes attribute"
    )


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """Index tensors directly when we can: the split stays a TensorDataset and is cheap to fingerprint."""
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[indices] for t in dataset.tensors))
    return Subset(dataset, indices.tolist())


# --- builtin loaders -------------------------------------------------------------------------------


def load_digits(config: DataConfig, seed: int, input_shape: tuple[int, ...] | None = None) -> Loaded:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], as (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    inputs = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return inputs, labels, 10


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


def load_imagefolder(
    config: ImageFolderData, seed: int, input_shape: tuple[int, ...] | None = None
) -> Loaded:
    """Every image of a small class-per-subfolder tree, resized to input_shape and held in memory."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(config.path)
    if input_shape is None:
        raise InputError(f"{root}: imagefolder needs model.input_shape, e.g. [3, 64, 64]")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InputError(
            f"{root}: imagefolder needs model.input_shape as [channels, height, width] with 1 or 3 "
            f"channels (got {list(input_shape)})"
        )
    channels, height, width = (int(s) for s in input_shape)
    steps: list[Any] = [transforms.Grayscale(1)] if channels == 1 else []
    steps += [transforms.Resize((height, width)), transforms.ToTensor()]
    if config.mean is not None or config.std is not None:
        if config.mean is None or config.std is None or not len(config.mean) == len(config.std) == channels:
            raise InputError(
                f"data.mean and data.std must both list one value per channel ({channels}) "
                f"(got mean={config.mean}, std={config.std})"
            )
        if any(s <= 0 for s in config.std):
            raise InputError(f"data.std must be positive (got {config.std})")
        steps.append(transforms.Normalize(config.mean, config.std))
    transform = transforms.Compose(steps)

    try:
        folder = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise InputError(
            f"{root}: not a usable image folder ({exc}); it needs one subfolder per class holding images"
        ) from None
    inputs, labels = [], []
    for path, label in folder.samples:
        try:
            image = folder.loader(path)
            inputs.append(transform(image))
        except Exception as exc:  # PIL raises many types for a bad file; name the file instead
            raise InputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
        labels.append(label)
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), len(folder.classes)


def load_tensors(config: TensorsData, seed: int, input_shape: tuple[int, ...] | None = None) -> Loaded:
    """Inputs and integer labels from a .safetensors or .npz file, read without unpickling."""
    path = Path(config.path)
    arrays = _read_tensor_file(path)
    for key in (config.inputs_key, config.labels_key):
        if key not in arrays:
            raise InputError(
                f"{path}: no key {key!r}; keys present: {', '.join(sorted(arrays)) or '(none)'} "
                "(set data.inputs_key / data.labels_key)"
            )
    inputs, labels = arrays[config.inputs_key], arrays[config.labels_key]
    if inputs.dtype in (torch.bool,) or inputs.is_complex():
        raise InputError(f"{path}: {config.inputs_key!r} must be numeric (got {inputs.dtype})")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InputError(
            f"{path}: {config.inputs_key!r} must have shape (samples, ...) with at least one sample "
            f"(got {tuple(inputs.shape)})"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"{path}: {config.labels_key!r} must hold integer class ids (got {labels.dtype})")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise InputError(
            f"{path}: {config.labels_key!r} must be 1-D with one label per input "
            f"(got shape {tuple(labels.shape)} for {inputs.shape[0]} inputs)"
        )
    labels = labels.to(torch.int64)
    if int(labels.min()) < 0:
        raise InputError(f"{path}: {config.labels_key!r} holds negative class ids (min {int(labels.min())})")
    return inputs.to(torch.float32), labels, int(labels.max()) + 1


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read safetensors file ({exc})") from None
    if suffix == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as npz:
                return {key: torch.from_numpy(np.ascontiguousarray(npz[key])) for key in npz.files}
        except (ValueError, OSError, TypeError) as exc:
            raise InputError(
                f"{path}: cannot read .npz without unpickling ({exc}); save plain numeric arrays"
            ) from None
    raise InputError(f"{path}: tensor data must be .safetensors or .npz (got {suffix or 'no extension'})")


__all__ = ["DataSplits", "load_data", "load_digits", "load_imagefolder", "load_synthetic", "load_tensors"]
