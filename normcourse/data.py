"""MNIST for the book: an embedded offline subset, a verified download cache, and batch samplers.

Three ways to get the data, chosen by ``load_mnist(source=...)``:

- ``"embedded"``: the first 10,000 MNIST training images, shipped inside the package (built by
  ``scripts/build_embedded_mnist.py``), split 8,000 train / 2,000 test. Works offline, always.
- ``"full"``: the four original IDX files (60,000 train / 10,000 test) from a cache directory,
  downloaded on request from public mirrors and checked against SHA-256 sums of the *decompressed*
  bytes (one mirror recompressed its files, so the .gz bytes differ between mirrors).
- ``"auto"``: full MNIST when it is in the cache (or can be downloaded, with ``download=True``),
  otherwise the embedded subset, with a warning when a download was attempted and failed.

The cache directory is the ``cache_dir`` argument, else the environment variable
``NORMCOURSE_DATA``, else ``~/.cache/normcourse/mnist``. A directory that already holds the files
(``.gz`` or decompressed) is only read, never written, so it may be read-only.

MNIST is by Yann LeCun and Corinna Cortes, licensed CC BY-SA 3.0.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.resources
import os
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from normcourse.validation import check_choice

__all__ = [
    "MIRRORS",
    "MNIST",
    "MNISTChecksumError",
    "MNISTDownloadError",
    "MNISTNotFoundError",
    "class_subset_batches",
    "default_cache_dir",
    "download_mnist",
    "iid_batches",
    "load_mnist",
    "parse_idx",
    "to_tensors",
]

# Tried in this order; each serves ``<name>.gz`` for the four names below.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# SHA-256 of the decompressed IDX files (the .gz bytes are not stable across mirrors).
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_SHA256

# The embedded subset (normcourse/datasets/); see its PROVENANCE.md. The sums are over
# ``array.tobytes()`` of the uint8 arrays, as written by scripts/build_embedded_mnist.py.
EMBEDDED_FILE = "mnist_train_first10k.npz"
EMBEDDED_IMAGES_SHA256 = "2f7182bf021ffc5c1f62db987487f14d899b5c639f421a80f3095affc09a7db2"
EMBEDDED_LABELS_SHA256 = "2f345bad07338ec537641465e169cc4b7288a44244f251211c7f842641e7d927"
EMBEDDED_TRAIN_SIZE = 8_000  # the first 8,000 images train, the last 2,000 test

DOWNLOAD_TIMEOUT_S = 30
_CHUNK = 1 << 16

# IDX type codes (third byte of the magic number) and the big-endian dtypes they stand for.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MNISTChecksumError(ValueError):
    """Bytes whose SHA-256 differs from the published one (corrupt or different file)."""


class MNISTDownloadError(ConnectionError):
    """No mirror delivered a file."""


class MNISTNotFoundError(FileNotFoundError):
    """Full MNIST was asked for but is not in the cache directory."""


@dataclass
class MNIST:
    """Images and labels of one MNIST source.

    train_images: (N_train, 28, 28) uint8; train_labels: (N_train,) int64;
    test_images: (N_test, 28, 28) uint8; test_labels: (N_test,) int64;
    source: a sentence saying which data this is and where it came from.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


# ---------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------
def parse_idx(raw: bytes) -> np.ndarray:
    """Decode one IDX file (already decompressed) into a NumPy array in native byte order.

    Layout: two zero bytes, a type code, the number of dimensions ``ndim``, then ``ndim`` big-endian
    uint32 sizes, then the values, big-endian, row-major. Raises ValueError when the magic number
    is wrong or the data are shorter or longer than the header promises.
    """
    raw = bytes(raw)
    if len(raw) < 4:
        raise ValueError(f"not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"not an IDX file: magic number {raw[:4].hex()} does not start with two zero bytes"
            " (a gzip file starts with 1f8b: decompress it first)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"not an IDX file: unknown type code 0x{code:02x} in the magic number")
    if ndim == 0:
        raise ValueError("IDX file declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"truncated IDX file: {len(raw)} bytes, the header alone needs {header_size}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "oversized"
        raise ValueError(
            f"{problem} IDX file: header says shape {shape} of {dtype.newbyteorder('=')} "
            f"({expected} bytes in all), got {len(raw)} bytes"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_size)
    # copy into native byte order: a writable array that owns its memory
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decompress(raw: bytes) -> bytes:
    """Gunzip ``raw`` if it is gzip (magic 1f 8b), else return it unchanged."""
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _verify(name: str, data: bytes, origin: str) -> None:
    """Raise MNISTChecksumError unless the decompressed ``data`` of file ``name`` has its sum."""
    expected, actual = MNIST_SHA256[name], _sha256(data)
    if actual != expected:
        raise MNISTChecksumError(
            f"checksum mismatch for {name} from {origin}: expected sha256 {expected}, "
            f"got {actual} (the decompressed bytes are checked)"
        )


# ---------------------------------------------------------------------------------------------
# Cache directory and download
# ---------------------------------------------------------------------------------------------
def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else $NORMCOURSE_DATA, else ~/.cache/normcourse/mnist."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("NORMCOURSE_DATA"):
        return Path(os.environ["NORMCOURSE_DATA"]).expanduser()
    return Path.home() / ".cache" / "normcourse" / "mnist"


def _find_file(directory: Path, name: str) -> Path | None:
    """The decompressed file ``name`` or ``name.gz`` in ``directory``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(directory: Path, name: str) -> bytes:
    """Decompressed, checksum-verified bytes of file ``name`` from ``directory``."""
    path = _find_file(directory, name)
    if path is None:
        raise MNISTNotFoundError(f"{name}(.gz) is not in {directory}")
    data = _decompress(path.read_bytes())
    _verify(name, data, str(path))
    return data


def _fetch(url: str, progress: bool) -> bytes:
    """All bytes at ``url`` (http, https or file), with a progress bar."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = response.headers.get("Content-Length")
        chunks = []
        with tqdm(
            total=int(total) if total else None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            disable=not progress,
        ) as bar:
            while chunk := response.read(_CHUNK):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A crash or an interrupted download never leaves a half-written file under the final name.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_one(name: str, directory: Path, mirrors: Sequence[str], progress: bool) -> None:
    """Fetch ``name.gz`` from the first mirror that delivers verified bytes; store it."""
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        try:
            raw = _fetch(url, progress)
            _verify(name, _decompress(raw), url)
        except MNISTChecksumError as err:
            failures.append(err)
            continue
        except (OSError, EOFError, http.client.HTTPException) as err:  # refused, 404, timeout,
            # a connection cut mid-transfer (IncompleteRead), a file that is not gzip
            failures.append(MNISTDownloadError(f"{url}: {err}"))
            continue
        _write_atomically(directory / f"{name}.gz", raw)
        return
    details = "; ".join(str(f) for f in failures) or "no mirrors given"
    if any(isinstance(f, MNISTChecksumError) for f in failures):
        raise MNISTChecksumError(f"no mirror delivered a valid {name}: {details}")
    raise MNISTDownloadError(
        f"could not download {name}.gz from any mirror ({details}). Without network, use "
        "load_mnist(source='embedded'), or copy the four MNIST .gz files into a directory and "
        "point NORMCOURSE_DATA at it"
    )


def download_mnist(
    cache_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] = MIRRORS,
    progress: bool = True,
) -> Path:
    """Make sure the four MNIST files are in the cache directory; return that directory.

    Files already there with the right checksum are kept (no network). Missing or corrupt ones are
    fetched from ``mirrors`` in order, verified, and written atomically as ``<name>.gz``.
    Raises MNISTDownloadError when no mirror answers, MNISTChecksumError when the bytes are wrong.
    """
    directory = default_cache_dir(cache_dir)
    for name in MNIST_SHA256:
        try:
            _read_verified(directory, name)
            continue
        except (MNISTNotFoundError, MNISTChecksumError, OSError, EOFError):
            pass  # missing, corrupt or unreadable: fetch it again
        directory.mkdir(parents=True, exist_ok=True)
        _download_one(name, directory, mirrors, progress)
    return directory


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _check_images_labels(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{what}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{what}: {images.shape[0]} images but labels of shape {labels.shape}")


def _load_full(directory: Path) -> MNIST:
    missing = [name for name in MNIST_SHA256 if _find_file(directory, name) is None]
    if missing:
        raise MNISTNotFoundError(
            f"full MNIST is not in {directory} (missing: {', '.join(missing)}). Get it with "
            "load_mnist(source='full', download=True) or download_mnist(), or set NORMCOURSE_DATA "
            "to a directory holding the four .gz files; source='embedded' works offline"
        )
    arrays = {name: parse_idx(_read_verified(directory, name)) for name in MNIST_SHA256}
    train_images, test_images = arrays[TRAIN_IMAGES], arrays[TEST_IMAGES]
    _check_images_labels(train_images, arrays[TRAIN_LABELS], f"{directory}/{TRAIN_IMAGES}")
    _check_images_labels(test_images, arrays[TEST_LABELS], f"{directory}/{TEST_IMAGES}")
    return MNIST(
        train_images=train_images,
        train_labels=arrays[TRAIN_LABELS].astype(np.int64),
        test_images=test_images,
        test_labels=arrays[TEST_LABELS].astype(np.int64),
        source=f"full MNIST from {directory} ({len(train_images):,} train / "
        f"{len(test_images):,} test)",
    )


def load_embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The embedded subset as shipped: images (10000, 28, 28) uint8, labels (10000,) uint8.

    Verified against the SHA-256 sums above, so a damaged install fails loudly.
    """
    resource = importlib.resources.files("normcourse") / "datasets" / EMBEDDED_FILE
    with resource.open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    for what, array, expected in (
        ("images", images, EMBEDDED_IMAGES_SHA256),
        ("labels", labels, EMBEDDED_LABELS_SHA256),
    ):
        actual = _sha256(array.tobytes())
        if actual != expected:
            raise MNISTChecksumError(
                f"embedded subset {EMBEDDED_FILE}: {what} have sha256 {actual}, expected "
                f"{expected}; rebuild it with scripts/build_embedded_mnist.py"
            )
    _check_images_labels(images, labels, EMBEDDED_FILE)
    return images, labels


def _load_embedded() -> MNIST:
    images, labels = load_embedded_arrays()
    labels = labels.astype(np.int64)
    n = EMBEDDED_TRAIN_SIZE
    return MNIST(
        train_images=images[:n],
        train_labels=labels[:n],
        test_images=images[n:],
        test_labels=labels[n:],
        source=f"embedded subset: first {len(images):,} MNIST training images, split "
        f"{n:,} train / {len(images) - n:,} test",
    )


def load_mnist(
    source: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    mirrors: Sequence[str] = MIRRORS,
) -> MNIST:
    """Load MNIST as uint8 images (N, 28, 28) and int64 labels (N,); see ``MNIST.source``.

    source="embedded": the packaged subset (8,000 train / 2,000 test), offline.
    source="full": the 60,000 / 10,000 original files from the cache directory (downloaded first
    when ``download=True``); raises with instructions when they are not there.
    source="auto": full MNIST if the cache holds it (or ``download=True`` fetches it), else the
    embedded subset; a failed download or a corrupt cache gives a warning and the subset.
    """
    check_choice(source, ("auto", "full", "embedded"), "MNIST source")
    if source == "embedded":
        return _load_embedded()
    directory = default_cache_dir(cache_dir)
    have_all = all(_find_file(directory, name) is not None for name in MNIST_SHA256)
    if source == "auto" and not have_all and not download:
        return _load_embedded()  # the ordinary offline case: nothing to warn about
    try:
        if download and not have_all:
            download_mnist(directory, mirrors=mirrors)
        return _load_full(directory)
    except (OSError, ValueError, EOFError) as err:  # network, checksum, permissions, bad file
        if source == "full":
            raise
        warnings.warn(
            f"full MNIST unavailable ({err}); falling back to the embedded subset "
            "(first 10,000 training images)",
            RuntimeWarning,
            stacklevel=2,
        )
        return _load_embedded()


# ---------------------------------------------------------------------------------------------
# Tensors and batch samplers
# ---------------------------------------------------------------------------------------------
def to_tensors(
    images: np.ndarray,
    labels: np.ndarray,
    device: str | torch.device = "cpu",
    flatten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) -> float32 in [0, 1], shape (N, 784) or (N, 1, 28, 28); labels
    (N,) -> int64. Both on ``device``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise TypeError(f"to_tensors expects uint8 pixel values 0..255, got dtype {images.dtype}")
    if images.ndim != 3:
        raise ValueError(f"to_tensors expects images of shape (N, H, W), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(
            f"to_tensors got {images.shape[0]} images but labels of shape {labels.shape}"
        )
    x = torch.from_numpy(images).to(device=device, dtype=torch.float32) / 255.0
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


def class_subset_batches(
    labels: np.ndarray,
    classes_per_batch: int,
    batch_size: int,
    seed: int,
    steps: int | None = None,
) -> Iterator[np.ndarray]:
    """Non-i.i.d. minibatches: index arrays (batch_size,) drawn from few classes at a time.

    Each batch picks ``classes_per_batch`` distinct classes at random and ``batch_size //
    classes_per_batch`` distinct examples of each (the Batch Renormalization paper's setup: a batch
    of 32 = 2 images of each of 16 random labels). The indices are shuffled within the batch.
    Infinite unless ``steps`` is given; the same ``seed`` gives the same batches.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= classes_per_batch <= len(classes):
        raise ValueError(
            f"classes_per_batch must be between 1 and the {len(classes)} classes present, "
            f"got {classes_per_batch}"
        )
    if batch_size <= 0 or batch_size % classes_per_batch:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of classes_per_batch "
            f"({classes_per_batch}) so that the classes get equal counts"
        )
    per_class = batch_size // classes_per_batch
    members = {c: np.flatnonzero(labels == c) for c in classes}
    smallest = min(len(m) for m in members.values())
    if per_class > smallest:
        raise ValueError(
            f"{per_class} examples per class needed, but one class has only {smallest}"
        )
    rng = np.random.default_rng(seed)
    step = 0
    while steps is None or step < steps:
        chosen = rng.choice(classes, size=classes_per_batch, replace=False)
        picks = [rng.choice(members[c], size=per_class, replace=False) for c in chosen]
        batch = np.concatenate(picks)
        yield rng.permutation(batch)
        step += 1


def iid_batches(
    n: int, batch_size: int, seed: int, steps: int | None = None
) -> Iterator[np.ndarray]:
    """Ordinary minibatches: index arrays (batch_size,) into range(n), reshuffled every epoch.

    Each epoch is a fresh permutation cut into full batches (the remainder is dropped, so every
    batch has the same size). Infinite unless ``steps`` is given; deterministic given ``seed``.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and n={n}, got {batch_size}")
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            if steps is not None and step >= steps:
                return
            yield order[start : start + batch_size]
            step += 1
