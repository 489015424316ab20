"""Data sets: the CIFAR pickle reader, the verified download, image folders and transforms."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from involution.training.datasets import collate_skipping_corrupt, load_data
from involution.training.download import download_and_extract
from involution.training.transforms import pad_crop_flip, random_resized_crop_flip
from training_data import cifar10_archive, cifar10_batches, write_cifar10, write_image_folder


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / "served"`` (plain http, loopback)."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar10_reader_matches_the_pickles(tmp_path):
    write_cifar10(tmp_path, n_train=23, n_test=7, seed=3)
    data = load_data("cifar10", tmp_path, augment=False)
    expected = cifar10_batches(23, 7, seed=3)
    assert (len(data.train), len(data.test), data.num_classes, data.in_chans) == (23, 7, 10, 3)
    first = expected["data_batch_1"]
    image, label, index = data.train.images[0], data.train.labels[0], 0
    assert int(label) == first[b"labels"][0]
    assert torch.equal(image.flatten(), torch.from_numpy(first[b"data"][0]))
    assert index == 0
    test_labels = torch.tensor(expected["test_batch"][b"labels"])
    assert torch.equal(data.test.labels, test_labels)


def test_cifar_download_over_http_on_loopback_verifies_md5(tmp_path, http_server):
    served, base = http_server
    archive = cifar10_archive(n_train=10, n_test=5)
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    md5 = hashlib.md5(archive).hexdigest()
    url = f"{base}/cifar-10-python.tar.gz"

    wrong = tmp_path / "wrong"
    with pytest.raises(ValueError, match="MD5"):
        load_data("cifar10", wrong, download=True, download_url=url, download_md5="0" * 32)
    assert not list(wrong.glob("*.tar.gz*")), "a file that failed its MD5 must not stay"

    data = load_data("cifar10", tmp_path / "ok", download=True, download_url=url, download_md5=md5)
    assert (len(data.train), len(data.test)) == (10, 5)
    with pytest.raises(OSError, match="failed"):
        download_and_extract(f"{base}/missing.tar.gz", md5, tmp_path / "missing")


def test_download_refuses_plain_http_off_loopback(tmp_path):
    with pytest.raises(ValueError, match="https"):
        download_and_extract("http://example.org/a.tar.gz", "0" * 32, tmp_path)


def test_cifar_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        load_data("cifar10", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps([1, 2])[:5])
    with pytest.raises(ValueError, match="data_batch_3"):
        load_data("cifar10", tmp_path)


def test_folder_skips_corrupt_images_in_workers_and_reports_them(tmp_path):
    write_image_folder(tmp_path, per_class=3)
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    good = next((tmp_path / "train" / "cat").glob("*.png")).read_bytes()
    truncated = tmp_path / "train" / "cat" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    data = load_data("folder", tmp_path, image_size=16)
    assert data.classes == ["cat", "dog"] and len(data.train) == 8
    loader = DataLoader(
        data.train, batch_size=3, num_workers=2, collate_fn=collate_skipping_corrupt
    )
    seen, skipped = 0, []
    for images, labels, bad_indices in loader:
        assert images.shape[1:] == (3, 16, 16) and images.shape[0] == labels.shape[0]
        seen += images.shape[0]
        skipped.extend(bad_indices)
    assert seen == 6
    assert sorted(Path(data.train.describe(i)).name for i in skipped) == [
        "broken.jpg",
        "truncated.png",
    ]


def test_folder_bad_layouts_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_data("folder", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train"):
        load_data("folder", tmp_path / "empty")
    root = write_image_folder(tmp_path / "data")
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=r"without images.*bird"):
        load_data("folder", root)
    with pytest.raises(ValueError, match="--data"):
        load_data("mnist")


def test_transforms_keep_shape_and_move_content():
    torch.manual_seed(1)
    image = torch.rand(3, 32, 32)
    crops = [pad_crop_flip(image) for _ in range(8)]
    assert all(c.shape == image.shape for c in crops)
    assert any(not torch.equal(c, image) for c in crops)
    resized = random_resized_crop_flip(torch.rand(3, 40, 60), 24)
    assert resized.shape == (3, 24, 24)
