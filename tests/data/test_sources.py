"""Dataset loaders and the seeded split: shapes, determinism, disjointness and user-facing errors."""

from __future__ import annotations

import sys
import types
from typing import ClassVar, Literal

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from compresspipe.data.config import DigitsData, ImageFolderData, SyntheticData, TensorsData
from compresspipe.data.sources import load_data
from compresspipe.errors import InputError
from compresspipe.recipe.spec import DataConfig


def _index_file(tmp_path, n: int = 50, suffix: str = ".npz"):
    """A tensors file whose input i holds the value i, so splits can be checked sample by sample."""
    inputs = np.arange(n, dtype=np.float64).reshape(n, 1)
    labels = np.arange(n, dtype=np.int64) % 3
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, inputs=inputs, labels=labels)
    else:
        save_file({"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}, str(path))
    return path


def _ids(dataset) -> list[int]:
    return [int(dataset[i][0].item()) for i in range(len(dataset))]


def test_digits_shapes_and_classes():
    splits = load_data(DigitsData(dataset="digits"), seed=0)
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 8, 8)
    assert len(splits.train) + len(splits.val) == 1797
    assert len(splits.val) == round(1797 * 0.2)
    assert len(splits.calibration) == 256
    x, y = splits.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert y.dtype == torch.int64 and y.dim() == 0
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_digits_upsampled_to_rgb_for_mobile_models_keep_their_samples_and_say_so():
    small = load_data(DigitsData(dataset="digits"), seed=0)
    big = load_data(DigitsData(dataset="digits", size=32, channels=3), seed=0)
    assert big.input_shape == (3, 32, 32) and len(big.val) == len(small.val)
    x, y = big.val[0]
    x8, y8 = small.val[0]
    assert int(y) == int(y8)  # the same split, sample for sample
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # gray repeated
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # corners aligned: the corner pixels are the bundled ones
    assert torch.isclose(x[0, 0, 0], x8[0, 0, 0]) and torch.isclose(x[0, -1, -1], x8[0, -1, -1])
    assert big.preprocessing is not None and big.preprocessing["resize"] == [32, 32]
    assert big.preprocessing["channels"] == 3
    # what the exported files' notes and metadata tell a deployer: the resize, not the bundled 8x8 alone
    assert "upsampled to 32x32" in big.preprocessing["description"]
    assert "repeated 3 times" in big.preprocessing["description"]
    with pytest.raises(ValueError):
        DigitsData(dataset="digits", channels=2)


def test_splits_are_deterministic_disjoint_and_calibration_is_from_train(tmp_path):
    config = TensorsData(dataset="tensors", path=str(_index_file(tmp_path)), calibration_samples=7)
    a, b = load_data(config, seed=3), load_data(config, seed=3)
    assert _ids(a.train) == _ids(b.train) and _ids(a.val) == _ids(b.val)
    assert a.fingerprint() == b.fingerprint()
    train, val = set(_ids(a.train)), set(_ids(a.val))
    assert train.isdisjoint(val) and train | val == set(range(50))
    assert len(val) == 10
    assert _ids(a.calibration) == _ids(a.train)[:7]

    other = load_data(config, seed=4)
    assert _ids(other.val) != _ids(a.val)
    assert other.fingerprint() != a.fingerprint()


def test_max_samples_and_small_calibration(tmp_path):
    config = TensorsData(
        dataset="tensors",
        path=str(_index_file(tmp_path)),
        max_samples=20,
        val_fraction=0.25,
        calibration_samples=100,
    )
    splits = load_data(config, seed=0)
    assert len(splits.train) == 15 and len(splits.val) == 5
    assert len(splits.calibration) == 15  # capped at the train split's size
    assert len(set(_ids(splits.train)) | set(_ids(splits.val))) == 20


def test_loader_shuffle_is_seeded(tmp_path):
    splits = load_data(TensorsData(dataset="tensors", path=str(_index_file(tmp_path))), seed=0)

    def order(**kw):
        return [int(v) for x, _ in splits.loader("train", 8, **kw) for v in x.flatten()]

    assert order() == _ids(splits.train)
    assert order(shuffle=True, seed=1) == order(shuffle=True, seed=1)
    assert order(shuffle=True, seed=1) != order(shuffle=True, seed=2)
    assert sorted(order(shuffle=True, seed=1)) == sorted(_ids(splits.train))
    with pytest.raises(ValueError, match="calibration"):
        splits.loader("test", 8)


def test_synthetic_is_learnable_and_shaped():
    config = SyntheticData(dataset="synthetic", shape=[2, 4, 4], num_classes=3, samples=90, noise=0.1)
    splits = load_data(config, seed=0, input_shape=(3, 8, 8))  # config.shape wins
    assert splits.input_shape == (2, 4, 4) and splits.num_classes == 3
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1, 2}
    # Nearest class mean separates the classes: the data carries signal, not just noise.
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    vx, vy = splits.val.tensors
    nearest = torch.cdist(vx.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == vy).float().mean() > 0.95
    assert load_data(config, seed=0).fingerprint() == splits.fingerprint()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_tensors_round_trip(tmp_path, suffix):
    inputs = torch.randn(12, 2, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 4] * 4, dtype=torch.int32)
    path = tmp_path / f"t{suffix}"
    if suffix == ".npz":
        np.savez(path, x=inputs.numpy(), y=labels.numpy())
    else:
        save_file({"x": inputs, "y": labels}, str(path))
    config = TensorsData(dataset="tensors", path=str(path), inputs_key="x", labels_key="y", val_fraction=0.25)
    splits = load_data(config, seed=0)
    assert splits.num_classes == 5 and splits.input_shape == (2, 3)
    tx, ty = splits.train.tensors
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64
    vx, vy = splits.val.tensors
    got = {
        tuple(row.flatten().tolist()): int(lab)
        for row, lab in zip(torch.cat([tx, vx]), torch.cat([ty, vy]), strict=True)
    }
    want = {tuple(row.flatten().tolist()): int(lab) for row, lab in zip(inputs.float(), labels, strict=True)}
    assert got == want and len(tx) == 9


def test_tensors_errors(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((4, 2)), targets=np.zeros(4, dtype=np.int64))
    with pytest.raises(InputError, match=r"no key 'labels'; keys present: inputs, targets"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)

    np.savez(path, inputs=np.zeros((4, 2)), labels=np.zeros(4))
    with pytest.raises(InputError, match="integer class ids for task classification"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)
    assert load_data(TensorsData(dataset="tensors", path=str(path)), seed=0, task="regression").num_classes == 1

    np.savez(path, inputs=np.array([[0.0, np.nan]] * 4), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(InputError, match="1 NaN or Inf|4 NaN or Inf"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)

    np.savez(path, inputs=np.zeros((4, 2)), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(InputError, match="one label per input"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)

    np.savez(path, inputs=np.zeros((4, 2)), labels=np.array([0, 1, object()], dtype=object))
    with pytest.raises(InputError, match="without unpickling"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)

    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(InputError, match=r"\.safetensors or \.npz"):
        load_data(TensorsData(dataset="tensors", path=str(other)), seed=0)


def _write_images(root, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 12), color=(40 * c + i, 100, 200)).save(root / name / f"{i}.png")


def test_imagefolder_grayscale_and_rgb(tmp_path):
    _write_images(tmp_path)
    gray = load_data(
        ImageFolderData(dataset="imagefolder", path=str(tmp_path)), seed=0, input_shape=(1, 4, 5)
    )
    assert gray.num_classes == 2 and gray.input_shape == (1, 4, 5)
    assert len(gray.train) + len(gray.val) == 6

    config = ImageFolderData(dataset="imagefolder", path=str(tmp_path), mean=[0.5] * 3, std=[0.25] * 3)
    rgb = load_data(config, seed=0, input_shape=(3, 6, 6))
    x, _ = rgb.train[0]
    assert x.shape == (3, 6, 6)
    # Blue channel is 200/255 everywhere; normalised: (200/255 - 0.5) / 0.25.
    assert torch.allclose(x[2], torch.full((6, 6), (200 / 255 - 0.5) / 0.25), atol=1e-5)


def test_imagefolder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="model.input_shape, e.g. \\[3, 64, 64\\]"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(empty)), seed=0)
    with pytest.raises(InputError, match=f"{empty}.*one subfolder per class"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(empty)), seed=0, input_shape=(3, 4, 4))

    good = tmp_path / "good"
    _write_images(good)
    config = ImageFolderData(dataset="imagefolder", path=str(good), mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(InputError, match=r"one value per channel \(3\)"):
        load_data(config, seed=0, input_shape=(3, 4, 4))

    (good / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.png: cannot read image"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(good)), seed=0, input_shape=(3, 4, 4))


def test_imagefolder_refuses_truncated_images_and_empty_classes_before_any_stage(tmp_path):
    from PIL import Image

    good = tmp_path / "good"
    _write_images(good)
    full = good / "cat" / "big.png"
    Image.effect_noise((64, 64), 40).convert("RGB").save(full)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])  # a truncated file: its header reads, its pixels do not
    with pytest.raises(InputError, match="big.png: cannot read image"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(good)), seed=0, input_shape=(3, 4, 4))
    full.unlink()
    (good / "bird").mkdir()  # a class folder with no image: a class no sample belongs to
    (good / "bird" / "notes.txt").write_text("todo")
    with pytest.raises(InputError, match="class folder\\(s\\) bird hold no images"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(good)), seed=0, input_shape=(3, 4, 4))


class _Squares(Dataset):
    """A plugin-style dataset that is not a TensorDataset."""

    classes = ("even", "odd")

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.full((2,), float(i * i)), torch.tensor(i % 2)


class ToyData(DataConfig):
    dataset: Literal["toy"]
    loader: ClassVar[str] = "cp_test_toy_plugin:load"


def test_plugin_loader_returning_a_dataset(monkeypatch):
    module = types.ModuleType("cp_test_toy_plugin")
    calls = []

    def load(config, seed, input_shape):
        calls.append((seed, input_shape))
        return _Squares()

    module.load = load
    monkeypatch.setitem(sys.modules, "cp_test_toy_plugin", module)
    splits = load_data(ToyData(dataset="toy", val_fraction=0.3), seed=5, input_shape=(2,))
    assert calls == [(5, (2,))]
    assert splits.num_classes == 2 and splits.input_shape == (2,)
    assert len(splits.train) == 7 and len(splits.val) == 3
    assert splits.fingerprint() == load_data(ToyData(dataset="toy", val_fraction=0.3), seed=5).fingerprint()


# --- synthetic-text, named inputs, real image splits, and bounded reading of what comes from outside ----------


@pytest.mark.parametrize(("target", "task"), [("sequence", "sequence_classification"),
                                              ("token", "token_classification"),
                                              ("next_token", "language_modeling"), ("regression", "regression")])
def test_synthetic_text_is_seeded_and_shaped_for_its_task(target, task):
    from compresspipe.data.config import SyntheticTextData

    config = SyntheticTextData(dataset="synthetic-text", vocab_size=50, seq_len=12, num_classes=3, samples=80,
                               target=target)
    splits = load_data(config, seed=0, task=task)
    x, y = splits.train[0]
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (12,)
    assert [i.name for i in splits.inputs] == ["input_ids", "attention_mask"]
    assert splits.inputs[0].dynamic == {0: "sequence"} and splits.inputs[0].range == (0, 50)
    assert bool((x["input_ids"][x["attention_mask"] == 0] == 0).all())  # padding is token 0
    assert splits.num_classes == {"sequence": 3, "token": 3, "next_token": 50, "regression": 1}[target]
    assert y.shape == {"sequence": (), "token": (12,), "next_token": (12,), "regression": (1,)}[target]
    assert load_data(config, seed=0, task=task).fingerprint() == splits.fingerprint()
    assert load_data(config, seed=1, task=task).fingerprint() != splits.fingerprint()


def test_tensors_with_several_named_inputs(tmp_path):
    path = tmp_path / "t.npz"
    ids = np.random.default_rng(0).integers(0, 9, (20, 5))
    np.savez(path, ids=ids, mask=np.ones((20, 5), dtype=bool), labels=np.arange(20) % 2)
    splits = load_data(TensorsData(dataset="tensors", path=str(path), inputs=["ids", "mask"]), seed=0)
    x, y = next(iter(splits.loader("train", 4)))
    assert set(x) == {"ids", "mask"} and x["ids"].dtype == torch.int64 and x["mask"].dtype == torch.int64
    assert [(i.name, i.dtype, i.shape) for i in splits.inputs] == [("ids", "int64", [5]), ("mask", "int64", [5])]


def _folder(root, classes=("cat", "dog"), per_class=3, offset=0):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), color=(40 * c + i + offset, 9 * i, 200)).save(root / name / f"{offset}-{i}.png")


def test_imagefolder_real_splits_stream_from_disk_with_class_names(tmp_path):
    _folder(tmp_path / "train", per_class=4)
    _folder(tmp_path / "val", per_class=2, offset=100)
    config = ImageFolderData(dataset="imagefolder", train_path=str(tmp_path / "train"),
                             val_path=str(tmp_path / "val"), mean=[0.5] * 3, std=[0.5] * 3, interpolation="nearest",
                             augment={"hflip": True})
    splits = load_data(config, seed=0, input_shape=(3, 4, 4))
    assert (len(splits.train), len(splits.val)) == (8, 4) and splits.classes == ["cat", "dog"]
    assert all("val" in str(p) for p in splits.val.files)  # the held-out images, not a share of train
    assert not hasattr(splits.train, "tensors")  # streamed: files, not a tensor in memory
    assert splits.preprocessing["mean"] == [0.5] * 3 and splits.preprocessing["interpolation"] == "nearest"
    assert splits.files["train"]["files"] == 8 and len(splits.files["val"]["sha256"]) == 64
    assert splits.calibration.augment is None and splits.val.augment is None
    order = ImageFolderData(dataset="imagefolder", train_path=str(tmp_path / "train"), classes=["dog", "cat"])
    assert load_data(order, seed=0, input_shape=(3, 4, 4)).classes == ["dog", "cat"]

    _folder(tmp_path / "val", classes=("bird",), per_class=1)
    with pytest.raises(InputError, match="bird are not among the training classes"):
        load_data(config, seed=0, input_shape=(3, 4, 4))


def test_imagefolder_walk_never_follows_folder_links_nor_counts_a_file_twice(tmp_path):
    root = tmp_path / "data"
    _folder(root)
    (root / "cat" / "up").symlink_to("..")  # a loop: would copy every class into cat, and never end
    (root / "cat" / "up2").symlink_to("..")
    splits = load_data(ImageFolderData(dataset="imagefolder", path=str(root)), seed=0, input_shape=(3, 4, 4))
    assert len(splits.train) + len(splits.val) == 6
    assert any("symlinked folder" in n for n in splits.notes)

    (root / "dog" / "copy.png").symlink_to(root / "cat" / "0-0.png")
    with pytest.raises(InputError, match="same file as .*cat/0-0.png"):
        load_data(ImageFolderData(dataset="imagefolder", path=str(root)), seed=0, input_shape=(3, 4, 4))
    (root / "dog" / "copy.png").unlink()
    _folder(tmp_path / "val")
    (tmp_path / "val" / "cat" / "leak.png").symlink_to(root / "dog" / "0-1.png")
    leak = ImageFolderData(dataset="imagefolder", train_path=str(root), val_path=str(tmp_path / "val"))
    with pytest.raises(InputError, match="in both splits"):
        load_data(leak, seed=0, input_shape=(3, 4, 4))


def test_npz_that_is_not_a_zip_or_is_corrupt(tmp_path):
    path = tmp_path / "x.npz"
    path.write_bytes(b"\x93NUMPY not really")
    with pytest.raises(InputError, match="not a zip"):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)
    np.savez(path, inputs=np.zeros((4, 2)), labels=np.zeros(4, dtype=np.int64))
    path.write_bytes(path.read_bytes()[:-30])  # central directory cut short
    with pytest.raises(InputError, match=str(path.name)):
        load_data(TensorsData(dataset="tensors", path=str(path)), seed=0)


def test_npz_bomb_is_refused_before_it_expands_under_a_memory_cap(tmp_path):
    import subprocess
    import zipfile

    from numpy.lib import format as npy

    path = tmp_path / "bomb.npz"
    rows = 3 * 2**27  # float32 (rows, 4): 6 GiB of zeros in a few MB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("inputs.npy", "w", force_zip64=True) as fh:
            npy.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (rows, 4)})
            chunk = bytes(2**24)
            for _ in range(4):  # the declared shape is what counts; 64 MiB of it is enough to check
                fh.write(chunk)
        np_labels = np.zeros(rows, dtype=np.int64)[:4]
        archive.writestr("labels.npy", _npy_bytes(np_labels))
    assert path.stat().st_size < 8 * 2**20
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (2 * 2**30, 2 * 2**30))\n"
            "from compresspipe.data.config import TensorsData\nfrom compresspipe.data.sources import load_data\n"
            "from compresspipe.errors import InputError\n"
            f"try:\n    load_data(TensorsData(dataset='tensors', path={str(path)!r}), seed=0)\n"
            "except InputError as exc:\n    print(exc); sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "corrupt or crafted" in out.stdout or "more than data.max_bytes" in out.stdout


def _npy_bytes(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
