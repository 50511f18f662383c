"""Tests of normcourse.data: IDX parsing, the verified download cache, the embedded subset, the
full-MNIST loader and the batch samplers. Downloads use tiny IDX files served from a temporary
directory (file:// or http.server on 127.0.0.1) with monkeypatched checksums: no internet."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from normcourse import data

torch.set_num_threads(1)

NAMES = list(data.MNIST_SHA256)
UNREACHABLE = "http://127.0.0.1:1/"  # port 1: connection refused at once


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Encode ``array`` as an IDX file (big-endian), independently of the parser under test."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def tiny_mnist(seed: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    """The four MNIST files in miniature: decompressed IDX bytes by name."""
    rng = np.random.default_rng(seed)
    return {
        data.TRAIN_IMAGES: idx_bytes(rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        data.TRAIN_LABELS: idx_bytes(rng.integers(0, 10, n_train, dtype=np.uint8)),
        data.TEST_IMAGES: idx_bytes(rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        data.TEST_LABELS: idx_bytes(rng.integers(0, 10, n_test, dtype=np.uint8)),
    }


@pytest.fixture
def tiny(monkeypatch):
    """Tiny MNIST files, with the module's checksums replaced by theirs."""
    files = tiny_mnist()
    sums = {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}
    monkeypatch.setattr(data, "MNIST_SHA256", sums)
    return files


def write_mirror(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
    return directory


@pytest.fixture
def http_mirror(tmp_path):
    """Serve a directory over http on 127.0.0.1; yield (url, directory, requested paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root, requests
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# IDX parser
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, array",
    [
        (0x08, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)),
        (0x08, np.array([7, 0, 255], dtype=np.uint8)),
        (0x09, np.array([-128, 5, 127], dtype=np.int8)),
        (0x0B, np.array([[-300, 2], [1000, -1]], dtype=np.int16)),
        (0x0C, np.array([70000, -70000, 1], dtype=np.int32)),
        (0x0D, np.array([1.5, -2.25], dtype=np.float32)),
        (0x0E, np.array([[np.pi], [-1e300]], dtype=np.float64)),
    ],
)
def test_parse_idx_round_trip(code, array):
    out = data.parse_idx(idx_bytes(array, code))
    assert out.shape == array.shape
    assert out.dtype == array.dtype  # native byte order
    np.testing.assert_array_equal(out, array)
    out.flat[0] = 0  # writable: owns its memory


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "two zero bytes"),
        (b"\x00\x00\x07\x01" + bytes(8), "unknown type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00", "header alone needs 16"),
        (idx_bytes(np.zeros((3, 4), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros(5, np.int32), 0x0C)[:-2], "truncated"),
        (idx_bytes(np.zeros(5, np.uint8)) + b"\x00", "oversized"),
    ],
)
def test_parse_idx_rejects_malformed_files(raw, message):
    with pytest.raises(ValueError, match=message):
        data.parse_idx(raw)


# ---------------------------------------------------------------------------------------------
# Download and cache
# ---------------------------------------------------------------------------------------------
def test_cache_dir_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMCOURSE_DATA", str(tmp_path / "env"))
    assert data.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("NORMCOURSE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "normcourse" / "mnist"


def test_download_over_http_then_cache_is_reused(tiny, http_mirror, tmp_path):
    url, root, requests = http_mirror
    write_mirror(root, tiny)
    cache = tmp_path / "cache"
    assert data.download_mnist(cache, mirrors=(url,), progress=False) == cache
    assert sorted(requests) == sorted(f"/{n}.gz" for n in NAMES)
    for name, raw in tiny.items():
        assert gzip.decompress((cache / f"{name}.gz").read_bytes()) == raw
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]  # no temp files left

    data.download_mnist(cache, mirrors=(url,), progress=False)
    mnist = data.load_mnist("full", cache_dir=cache, download=True, mirrors=(url,))
    assert len(requests) == 4  # second call and load: served from the cache
    np.testing.assert_array_equal(mnist.train_images, data.parse_idx(tiny[data.TRAIN_IMAGES]))
    np.testing.assert_array_equal(mnist.test_labels, data.parse_idx(tiny[data.TEST_LABELS]))
    assert mnist.train_labels.dtype == np.int64 and mnist.test_labels.dtype == np.int64
    assert mnist.source == f"full MNIST from {cache} (6 train / 4 test)"


def test_download_from_file_url(tiny, tmp_path):
    mirror = write_mirror(tmp_path / "mirror", tiny)
    cache = tmp_path / "cache"
    data.download_mnist(cache, mirrors=(mirror.as_uri() + "/",), progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in NAMES)


def test_corrupt_download_raises_checksum_error_and_writes_nothing(tiny, http_mirror, tmp_path):
    url, root, _ = http_mirror
    corrupt = dict(tiny)
    corrupt[data.TRAIN_LABELS] = idx_bytes(np.full(6, 9, np.uint8))  # valid IDX, wrong bytes
    write_mirror(root, corrupt)
    cache = tmp_path / "cache"
    with pytest.raises(data.MNISTChecksumError) as err:
        data.download_mnist(cache, mirrors=(url,), progress=False)
    message = str(err.value)
    assert data.TRAIN_LABELS in message
    assert data.MNIST_SHA256[data.TRAIN_LABELS] in message  # expected sum
    assert hashlib.sha256(corrupt[data.TRAIN_LABELS]).hexdigest() in message  # actual sum
    assert not (cache / f"{data.TRAIN_LABELS}.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_corrupt_cached_file_is_downloaded_again(tiny, tmp_path):
    mirror = write_mirror(tmp_path / "mirror", tiny)
    cache = write_mirror(tmp_path / "cache", tiny)
    (cache / f"{data.TEST_IMAGES}.gz").write_bytes(gzip.compress(b"garbage"))
    data.download_mnist(cache, mirrors=(mirror.as_uri() + "/",), progress=False)
    repaired = gzip.decompress((cache / f"{data.TEST_IMAGES}.gz").read_bytes())
    assert repaired == tiny[data.TEST_IMAGES]


def test_falls_back_to_the_next_mirror(tiny, http_mirror, tmp_path):
    url, root, requests = http_mirror
    write_mirror(root, tiny)
    missing = (tmp_path / "empty").as_uri() + "/"  # file:// mirror without the files
    cache = tmp_path / "cache"
    data.download_mnist(cache, mirrors=(UNREACHABLE, missing, url), progress=False)
    assert len(requests) == 4
    assert data.load_mnist("full", cache_dir=cache).train_images.shape == (6, 28, 28)


def test_no_network_gives_a_clear_error(tiny, tmp_path):
    with pytest.raises(data.MNISTDownloadError, match=f"{data.TRAIN_IMAGES}.gz.*127.0.0.1:1"):
        data.download_mnist(tmp_path / "cache", mirrors=(UNREACHABLE,), progress=False)


def test_auto_falls_back_to_embedded_with_a_warning(tmp_path):
    with pytest.warns(RuntimeWarning, match="falling back to the embedded subset") as record:
        mnist = data.load_mnist("auto", cache_dir=tmp_path / "cache", download=True,
                                mirrors=(UNREACHABLE,))
    assert "could not download" in str(record[0].message)
    assert mnist.source.startswith("embedded subset")
    assert mnist.train_images.shape == (8000, 28, 28)


def test_full_without_files_explains_how_to_get_them(tmp_path):
    with pytest.raises(data.MNISTNotFoundError, match="download=True"):
        data.load_mnist("full", cache_dir=tmp_path)
    with pytest.raises(data.MNISTDownloadError):
        data.load_mnist("full", cache_dir=tmp_path, download=True, mirrors=(UNREACHABLE,))


def test_auto_offline_uses_embedded_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnist = data.load_mnist("auto", cache_dir=tmp_path)
    assert mnist.source.startswith("embedded subset")


def test_auto_prefers_the_cache_and_accepts_decompressed_files(tiny, tmp_path):
    for name, raw in tiny.items():
        (tmp_path / name).write_bytes(raw)
    mnist = data.load_mnist("auto", cache_dir=tmp_path)
    assert mnist.source.startswith("full MNIST from")
    np.testing.assert_array_equal(mnist.test_images, data.parse_idx(tiny[data.TEST_IMAGES]))


def test_corrupt_cache_raises_in_full_mode_and_warns_in_auto(tiny, tmp_path):
    cache = write_mirror(tmp_path, tiny)
    (cache / f"{data.TRAIN_IMAGES}.gz").write_bytes(gzip.compress(tiny[data.TRAIN_IMAGES][:-28]))
    with pytest.raises(data.MNISTChecksumError, match=data.TRAIN_IMAGES):
        data.load_mnist("full", cache_dir=cache)
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert data.load_mnist("auto", cache_dir=cache).source.startswith("embedded")


def test_env_var_selects_the_cache(tiny, tmp_path, monkeypatch):
    write_mirror(tmp_path, tiny)
    monkeypatch.setenv("NORMCOURSE_DATA", str(tmp_path))
    assert data.load_mnist("full").train_images.shape == (6, 28, 28)


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="unknown MNIST source 'mnist'; choose one of 'auto', 'full', 'embedded'"):
        data.load_mnist("mnist")


# ---------------------------------------------------------------------------------------------
# Embedded subset and full MNIST
# ---------------------------------------------------------------------------------------------
def test_embedded_subset_checksum_shape_and_split():
    images, labels = data.load_embedded_arrays()
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.uint8
    assert hashlib.sha256(images.tobytes()).hexdigest() == data.EMBEDDED_IMAGES_SHA256
    assert hashlib.sha256(labels.tobytes()).hexdigest() == data.EMBEDDED_LABELS_SHA256
    assert set(np.unique(labels)) == set(range(10))
    mnist = data.load_mnist("embedded")
    assert mnist.train_images.shape == (8000, 28, 28) and mnist.test_images.shape == (2000, 28, 28)
    assert mnist.train_labels.dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([mnist.train_images, mnist.test_images]), images)
    np.testing.assert_array_equal(np.concatenate([mnist.train_labels, mnist.test_labels]), labels)
    assert mnist.source == (
        "embedded subset: first 10,000 MNIST training images, split 8,000 train / 2,000 test"
    )


def test_embedded_subset_is_verified_on_load(monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_IMAGES_SHA256", "0" * 64)
    with pytest.raises(data.MNISTChecksumError, match="rebuild it"):
        data.load_mnist("embedded")


def shared_mnist_dir() -> Path:
    env = os.environ.get("NORMCOURSE_SHARED_MNIST")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def test_full_mnist_from_the_shared_folder_matches_the_embedded_subset():
    directory = shared_mnist_dir()
    if not all((directory / f"{n}.gz").is_file() for n in NAMES):
        pytest.skip(f"full MNIST not found in {directory} (set NORMCOURSE_SHARED_MNIST)")
    def listing():
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())

    before = listing()
    mnist = data.load_mnist("auto", cache_dir=directory, download=True)  # download: nothing to do
    assert listing() == before  # only read: the shared folder is read-only
    assert mnist.train_images.shape == (60_000, 28, 28)
    assert mnist.test_images.shape == (10_000, 28, 28)
    assert mnist.train_labels.shape == (60_000,) and mnist.test_labels.shape == (10_000,)
    assert mnist.source == f"full MNIST from {directory} (60,000 train / 10,000 test)"
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first ten
    images, labels = data.load_embedded_arrays()
    np.testing.assert_array_equal(mnist.train_images[:10_000], images)
    np.testing.assert_array_equal(mnist.train_labels[:10_000], labels)


# ---------------------------------------------------------------------------------------------
# Tensors and samplers
# ---------------------------------------------------------------------------------------------
def test_to_tensors_scales_and_shapes():
    images = np.array([[[0, 255], [51, 102]]] * 3, dtype=np.uint8)  # (3, 2, 2)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    x, y = data.to_tensors(images, labels)
    assert x.dtype == torch.float32 and x.shape == (3, 4) and y.dtype == torch.int64
    torch.testing.assert_close(x[0], torch.tensor([0.0, 1.0, 0.2, 0.4]))
    assert y.tolist() == [1, 2, 3]
    x4, _ = data.to_tensors(images, labels, device="cpu", flatten=False)
    assert x4.shape == (3, 1, 2, 2)
    torch.testing.assert_close(x4.reshape(3, -1), x)
    with pytest.raises(TypeError, match="uint8"):
        data.to_tensors(images.astype(np.float32), labels)
    with pytest.raises(ValueError, match="labels"):
        data.to_tensors(images, labels[:2])


def test_class_subset_batches_have_k_classes_with_equal_counts():
    labels = np.repeat(np.arange(10), 40)
    np.random.default_rng(0).shuffle(labels)
    seen = set()
    sampler = data.class_subset_batches(labels, 3, batch_size=12, seed=1, steps=50)
    for batch in sampler:
        assert batch.shape == (12,)
        assert len(set(batch.tolist())) == 12  # no repeated example within a batch
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 3 and counts.tolist() == [4, 4, 4]
        seen.update(classes.tolist())
    assert seen == set(range(10))  # the classes are drawn at random, not fixed


def test_class_subset_batches_are_deterministic_and_infinite():
    labels = np.repeat(np.arange(5), 10)
    first = list(data.class_subset_batches(labels, 2, 6, seed=3, steps=20))
    again = list(data.class_subset_batches(labels, 2, 6, seed=3, steps=20))
    other = list(data.class_subset_batches(labels, 2, 6, seed=4, steps=20))
    assert len(first) == 20
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    endless = data.class_subset_batches(labels, 2, 6, seed=3)
    assert all(np.array_equal(next(endless), b) for b in first)
    assert len(next(endless)) == 6  # keeps going past 20


@pytest.mark.parametrize(
    "k, batch_size, message",
    [(0, 6, "between 1 and the 5 classes"), (6, 6, "between 1 and the 5 classes"),
     (4, 6, "multiple of"), (1, 11, "only 10")],
)
def test_class_subset_batches_reject_bad_arguments(k, batch_size, message):
    with pytest.raises(ValueError, match=message):
        next(data.class_subset_batches(np.repeat(np.arange(5), 10), k, batch_size, seed=0))


def test_iid_batches_cover_each_epoch_once_and_are_deterministic():
    batches = list(data.iid_batches(10, 3, seed=0, steps=6))  # two epochs of 3 batches
    assert [len(b) for b in batches] == [3] * 6
    for epoch in (batches[:3], batches[3:]):
        flat = np.concatenate(epoch)
        assert len(set(flat.tolist())) == 9 and flat.max() < 10
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))
    again = list(data.iid_batches(10, 3, seed=0, steps=6))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        next(data.iid_batches(10, 11, seed=0))
