"""The data sets ``involution train`` and ``eval`` read: digits, CIFAR-10/100 and image folders.

- ``digits``: scikit-learn's embedded handwritten digits (1,797 8x8 images, 10 classes),
  upsampled to 32x32, with a fixed stratified 75/25 train/test split. No download.
- ``cifar10`` / ``cifar100``: the official python-pickle archives (``data_batch_1..5`` and
  ``test_batch``; ``train`` and ``test`` for CIFAR-100) in a local directory, optionally
  downloaded (see :mod:`.download`).
- ``folder``: ImageNet-style ``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>``,
  decoded with Pillow in the DataLoader's worker processes. A file Pillow cannot decode is
  skipped (the sample comes back as ``None`` and :func:`collate_skipping_corrupt` drops it), so
  the run goes on and reports how many it skipped.

Each sample is ``(image, label, index)``; the index lets the training loop name skipped files.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .download import download_and_extract
from .transforms import Transform, eval_transform, train_transform

__all__ = [
    "CIFAR_ARCHIVES",
    "DATA_KINDS",
    "ArrayDataset",
    "DataSets",
    "ImageFolder",
    "collate_skipping_corrupt",
    "first_readable",
    "load_data",
]

logger = logging.getLogger(__name__)

DATA_KINDS = ("digits", "cifar10", "cifar100", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class CifarArchive:
    """Where an official CIFAR archive lives and what it holds."""

    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_ARCHIVES = {
    "cifar10": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ArrayDataset(Dataset):
    """Images held in memory: uint8 (scaled to [0, 1]) or float, shape (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length"
            )
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.images[index]
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        return self.transform(image), int(self.labels[index]), index

    def describe(self, index: int) -> str:
        """A name for sample ``index`` in messages."""
        return f"sample {index}"

    def readable(self, index: int) -> bool:
        """Whether sample ``index`` can be read: always, for images in memory."""
        return 0 <= index < len(self)


class ImageFolder(Dataset):
    """Images in ``<root>/<class>/<file>`` folders, decoded with Pillow as they are read.

    Args:
        root: the directory of class folders.
        transform: applied to the decoded (3, H, W) float image in [0, 1].
        classes: class names in label order; by default the sorted folder names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no class folder, a class folder holds no image, or
            ``classes`` names a folder that is missing.
    """

    def __init__(
        self, root: str | os.PathLike, transform: Transform, classes: Sequence[str] | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not found:
            raise ValueError(
                f"image folder {str(self.root)!r} has no class sub-folders "
                "(expected <folder>/<class>/<image>)"
            )
        self.classes = list(found if classes is None else classes)
        missing = sorted(set(self.classes) - set(found))
        if missing:
            raise ValueError(f"image folder {str(self.root)!r} lacks the class folders {missing}")
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            files = sorted(
                p
                for p in (self.root / name).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                empty.append(name)
            self.samples.extend((p, label) for p in files)
        if empty:
            raise ValueError(
                f"class folders without images in {str(self.root)!r}: {empty} "
                f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Any:
        """The RGB Pillow image of sample ``index``, or None when Pillow cannot decode it."""
        from PIL import Image

        try:
            with Image.open(self.samples[index][0]) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        label = self.samples[index][1]
        rgb = self._decode(index)
        if rgb is None:
            return None, label, index
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        image = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255
        return self.transform(image), label, index

    def describe(self, index: int) -> str:
        """The file of sample ``index``."""
        return str(self.samples[index][0])

    def readable(self, index: int) -> bool:
        """Whether the file of sample ``index`` decodes (without the transform)."""
        return self._decode(index) is not None


def collate_skipping_corrupt(
    batch: Sequence[tuple[torch.Tensor | None, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stacks a batch, dropping samples that failed to decode.

    Returns:
        ``(images, labels, skipped)``: the good images and labels, and the indices of the
        samples dropped. ``images`` has 0 rows when every sample failed.
    """
    good = [(image, label) for image, label, _ in batch if image is not None]
    skipped = [index for image, _, index in batch if image is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, skipped


def first_readable(dataset: Dataset, what: str) -> int:
    """The index of the first sample of ``dataset`` that can be read.

    Stops at the first readable sample, so it costs one decode on healthy data; it reads every
    file only when none decodes. Transforms are not run (no random state is used).

    Raises:
        ValueError: the data set is empty or none of its samples can be read.
    """
    size = len(dataset)  # type: ignore[arg-type]
    for index in range(size):
        if dataset.readable(index):  # type: ignore[attr-defined]
            return index
    if size == 0:
        raise ValueError(f"{what} is empty")
    example = dataset.describe(0)  # type: ignore[attr-defined]
    raise ValueError(
        f"{what} has no readable image: none of its {size} files decodes (e.g. {example})"
    )


@dataclass
class DataSets:
    """A training and a test set with what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    classes: list[str]


def _digits(augment: bool) -> DataSets:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=0.25, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    mean = images[train_idx].mean().item()
    std = images[train_idx].std().item()
    return DataSets(
        train=ArrayDataset(
            images[train_idx],
            labels[train_idx],
            train_transform("array", 32, [mean], [std], augment, flip=False),
        ),
        test=ArrayDataset(
            images[test_idx], labels[test_idx], eval_transform("array", 32, [mean], [std])
        ),
        num_classes=10,
        in_chans=1,
        image_size=32,
        classes=[str(d) for d in range(10)],
    )


def _read_cifar_file(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    # The official archives are pickles of dicts with bytes keys; pickle is their format.
    try:
        with open(path, "rb") as f:
            entry: dict[Any, Any] = pickle.load(f, encoding="bytes")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = torch.as_tensor(bytearray(bytes(entry["data"])), dtype=torch.uint8)
        labels = torch.tensor(list(entry[label_key]), dtype=torch.long)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"CIFAR file {str(path)!r} is not a valid CIFAR batch: {err!r}") from err
    return data.view(len(labels), 3, 32, 32), labels


def _cifar(
    kind: str,
    data_dir: str | os.PathLike,
    augment: bool,
    download: bool,
    url: str | None,
    md5: str | None,
) -> DataSets:
    spec = CIFAR_ARCHIVES[kind]
    root = Path(data_dir)
    folder = root / spec.folder
    if not (folder / spec.test_files[0]).is_file() and download:
        download_and_extract(url or spec.url, md5 or spec.md5, root)
    for name in spec.train_files + spec.test_files:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"--data {kind}: {str(folder / name)!r} not found under --data-dir "
                f"{str(root)!r} (expected the official python archive extracted there; "
                "pass --download to fetch it)"
            )

    def read(names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_file(folder / n, spec.label_key) for n in names]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    (train_x, train_y), (test_x, test_y) = read(spec.train_files), read(spec.test_files)
    for labels in (train_y, test_y):
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < spec.num_classes:
            raise ValueError(
                f"--data {kind}: labels in {str(folder)!r} must lie in [0, {spec.num_classes})"
            )
    return DataSets(
        train=ArrayDataset(
            train_x, train_y, train_transform("array", 32, spec.mean, spec.std, augment)
        ),
        test=ArrayDataset(test_x, test_y, eval_transform("array", 32, spec.mean, spec.std)),
        num_classes=spec.num_classes,
        in_chans=3,
        image_size=32,
        classes=[str(i) for i in range(spec.num_classes)],
    )


def _folder(data_dir: str | os.PathLike, image_size: int, augment: bool) -> DataSets:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {str(root)!r} does not exist")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"--data folder: {str(root / split)!r} not found (expected "
                "<data-dir>/train/<class>/<image> and <data-dir>/val/<class>/<image>)"
            )
    train = ImageFolder(
        root / "train",
        train_transform("folder", image_size, _IMAGENET_MEAN, _IMAGENET_STD, augment),
    )
    test = ImageFolder(
        root / "val", eval_transform("folder", image_size, _IMAGENET_MEAN, _IMAGENET_STD)
    )
    if test.classes != train.classes:
        raise ValueError(
            f"--data folder: class folders of val ({test.classes}) differ from train "
            f"({train.classes})"
        )
    return DataSets(train, test, len(train.classes), 3, image_size, train.classes)


def load_data(
    kind: str,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    augment: bool = True,
    download: bool = False,
    download_url: str | None = None,
    download_md5: str | None = None,
) -> DataSets:
    """Loads a training and a test set.

    Args:
        kind: one of :data:`DATA_KINDS`.
        data_dir: directory of the data (``cifar*`` and ``folder``; unused for ``digits``).
        image_size: crop size for ``folder`` data (the others are 32x32).
        augment: random augmentation of the training set; off, it gets the test transform.
        download: fetch a missing CIFAR archive.
        download_url, download_md5: a mirror of the official archive and its MD5.

    Raises:
        ValueError: an unknown kind, or invalid data.
        FileNotFoundError: the data directory or files are missing.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"--data ({kind!r}) must be one of {list(DATA_KINDS)}")
    if kind == "digits":
        return _digits(augment)
    if data_dir is None:
        raise ValueError(f"--data {kind} needs --data-dir")
    if kind == "folder":
        return _folder(data_dir, image_size, augment)
    return _cifar(kind, data_dir, augment, download, download_url, download_md5)
