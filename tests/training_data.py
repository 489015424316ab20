"""Small data sets in their real on-disk formats, generated inside the tests (no network)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import torch


def cifar10_batches(n_train: int, n_test: int, seed: int = 0) -> dict[str, dict]:
    """Random CIFAR-10 batches as the official archive pickles them (bytes keys, uint8 rows)."""
    gen = torch.Generator().manual_seed(seed)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for name, size in [*zip(names, sizes, strict=True), ("test_batch", n_test)]:
        labels = torch.randint(0, 10, (size,), generator=gen)
        # A class-dependent mean makes the data learnable.
        data = (torch.rand(size, 3072, generator=gen) * 128 + labels[:, None] * 12).to(torch.uint8)
        batches[name] = {b"data": data.numpy(), b"labels": labels.tolist(), b"batch_label": name}
    return batches


def write_cifar10(root: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """Writes <root>/cifar-10-batches-py/ as extracted from the official archive."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, entry in cifar10_batches(n_train, n_test, seed).items():
        (folder / name).write_bytes(pickle.dumps(entry))
    return root


def cifar10_archive(n_train: int = 20, n_test: int = 10, seed: int = 0) -> bytes:
    """A cifar-10-python.tar.gz with the official layout."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, entry in cifar10_batches(n_train, n_test, seed).items():
            payload = pickle.dumps(entry)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4, size: int = 20
) -> Path:
    """Random RGB PNG and JPEG images in <root>/{train,val}/<class>/."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size + i, size + 2 * label, 3), generator=gen)
                image = Image.fromarray(pixels.to(torch.uint8).numpy())
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root
