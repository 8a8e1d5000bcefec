"""Datasets: offline preparation, random-access sources and a resumable pipeline.

Three parts, in the order a run uses them:

1. `prepare` builds the canonical TFDS dataset for MNIST or Fashion-MNIST from the
   original IDX files on disk, with no network. Debian ships Fashion-MNIST:
   `apt-get install dataset-fashion-mnist` puts the four `*-ubyte.gz` files in
   /usr/share/datasets/fashion-mnist. Afterwards
   `tfds.data_source(name, data_dir=..., download=False)` finds the dataset under
   the same name, version, splits and features as the online builder gives.
2. `load_source` opens a prepared TFDS split as a random-access source of
   `dict(image=uint8 (H, W, C), label=int)`; `ArraySource` does the same for
   arrays in memory (tests, synthetic data).
3. `Loader` turns a source into normalised, augmented batches. `batch(step)` is a
   pure function of (seed, step), so a resumed run sees the batches it would
   have seen, and each process takes a disjoint slice of the global batch.

How `prepare` drives TFDS (tensorflow-datasets 4.9.10, without TensorFlow). It
subclasses the real builder (`tensorflow_datasets.image_classification.mnist.MNIST`
or `FashionMNIST`), keeping its name, version and `_info` (features, description,
citation), and replaces only the two methods that fetch and parse the raw files;
TFDS itself then writes the dataset and its metadata. The routes TFDS offers do
not work here (read in its 4.9.10 source):

* `DownloadConfig(manual_dir=...)`: for URLs with registered checksums the
  download manager does use `manual_dir/<file name>`, but it checks the sha256
  of the `.gz` file, and Debian's files have another gzip header (no file name
  stored, 23-24 bytes shorter), so the check fails.
* The builder's own `_generate_examples` and TFDS's gzip extractor read with
  `tf.io.gfile`, and `tfds.features.Image` encodes NumPy arrays with
  `tf.image.encode_png`: all three need TensorFlow.

So the subclass reads the IDX files with gzip and NumPy and hands TFDS PNG bytes
encoded by Pillow, which the Image feature stores as given. The files are written
as array_record, which `tfds.data_source` reads without TensorFlow (tfrecord
would need `tf.data`). TensorFlow is not needed at any point.

What differs from an online build: the PNG bytes (same pixels, other
compression), the file format (array_record, not tfrecord), `moduleName` in
dataset_info.json (`dnl_zoo.data`), and no download size or checksums. Keys are
the IDX indices, as in the online builder, so the TFDS writer's shuffle (by a
hash of key and split name) gives the same example order: index i of a prepared
split is not row i of its IDX file.

Normalisation: `mean` and `std` are per channel on the [0, 1] scale (pixel / 255);
a batch holds `(pixel / 255 - mean) / std` as float32.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from PIL import Image
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from dnl_zoo.errors import ActionableError

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_IN_MEMORY_BYTES = 2**30  # load_source reads splits below this into memory


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about one dataset.

    `image_shape` is the model's input (H, W, C) after preprocessing; `mean` and
    `std` are per channel on the [0, 1] scale (pixel / 255), over the train split.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str | None
    train_split: str = "train"
    eval_split: str = "test"


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "fashion_mnist", (28, 28, 1), 10, (0.2860,), (0.3530,), "fashion_mnist"
        ),
        # NOTE: no flips for digits, which are not mirror-symmetric.
        DatasetInfo("mnist", (28, 28, 1), 10, (0.1307,), (0.3081,), None),
        # Per-pixel std over the train split; the often quoted (0.2023, 0.1994,
        # 0.2010) is the std of per-image means.
        DatasetInfo(
            "cifar10",
            (32, 32, 3),
            10,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            "cifar",
        ),
        DatasetInfo(
            "cifar100",
            (32, 32, 3),
            100,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "cifar",
        ),
        DatasetInfo(
            "imagenet2012",
            (224, 224, 3),
            1000,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            "imagenet",
            eval_split="validation",
        ),
    ]
}


class DataNotFoundError(ActionableError, FileNotFoundError):
    """A dataset is not prepared in the data directory; the message says how to."""


def default_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


# ---------------------------------------------------------------------------
# Offline preparation from IDX files.

# split -> (images, labels), the file names LeCun and Zalando publish.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_COUNTS = {"train": 60_000, "test": 10_000}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file of uint8 data, gzipped (`.gz`) or not.

    Returns:
      (count, rows, cols) for an image file, (count,) for a label file.
    """
    path = pathlib.Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(
            f"expected an IDX file of uint8 (magic bytes 00 00 08 ndim) at {path}, "
            f"got {data[:4].hex(' ')}"
        )
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim)
    )
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(shape):
        raise ValueError(
            f"expected {math.prod(shape)} bytes of data for shape {shape} in {path}, "
            f"got {len(data) - offset}; the file is truncated or not IDX"
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _find_idx(source_dir: pathlib.Path, stem: str) -> pathlib.Path:
    for path in (source_dir / f"{stem}.gz", source_dir / stem):
        if path.is_file():
            return path
    present = sorted(p.name for p in source_dir.glob("*")) or "nothing"
    raise FileNotFoundError(
        f"expected {stem}.gz (or {stem}) in {source_dir}, found {present}; for "
        "Fashion-MNIST run `apt-get install dataset-fashion-mnist` and pass "
        f"--source {DEBIAN_FASHION_MNIST}"
    )


def _read_idx_splits(source_dir: pathlib.Path) -> dict[str, tuple]:
    """Reads and checks the four IDX files of an MNIST-format dataset.

    Returns:
      split -> (images (count, 28, 28, 1) uint8, labels (count,) uint8).
    """
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images = read_idx(_find_idx(source_dir, images_stem))
        labels = read_idx(_find_idx(source_dir, labels_stem))
        count = _IDX_COUNTS[split]
        if images.shape != (count, 28, 28) or labels.shape != (count,):
            raise ValueError(
                f"expected {split} images ({count}, 28, 28) and labels ({count},) "
                f"in {source_dir}, got {images.shape} and {labels.shape}"
            )
        if labels.max() >= 10:
            raise ValueError(f"expected {split} labels in 0..9, got {labels.max()}")
        splits[split] = (images[..., None], labels)
    return splits


def _same_examples(
    images: np.ndarray,
    labels: np.ndarray,
    other_images: np.ndarray,
    other_labels: np.ndarray,
) -> bool:
    """Whether two sets of (image, label) pairs are equal, in any order."""

    def sorted_rows(images, labels):
        rows = np.concatenate([labels[:, None], images.reshape(len(images), -1)], 1)
        rows = np.ascontiguousarray(rows.astype(np.uint8))
        return np.sort(rows.view(np.dtype((np.void, rows.shape[1])))[:, 0])

    return images.shape == other_images.shape and np.array_equal(
        sorted_rows(images, labels), sorted_rows(other_images, other_labels)
    )


def _encode_png(image: np.ndarray) -> bytes:
    """image: (28, 28, 1) uint8 -> PNG bytes (greyscale)."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="png")
    return buffer.getvalue()


class _FromIdxArrays:
    """Feeds a canonical MNIST-family builder arrays read here, not downloads."""

    # TFDS looks for download checksums next to the builder's code file; nothing
    # is downloaded here. (Finding that file outside tensorflow_datasets imports
    # `importlib_resources`, which TFDS 4.9.10 does not declare as a dependency.)
    code_path = None

    def __init__(self, *, splits: dict[str, tuple[np.ndarray, np.ndarray]], **kwargs):
        self._idx_splits = splits
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the arrays are already read
        return {
            split: self._generate_examples(images, labels)
            for split, (images, labels) in self._idx_splits.items()
        }

    def _generate_examples(self, images, labels):
        # The key is the IDX index, as in the canonical builder, so the writer's
        # hash shuffle orders the examples as an online build does.
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": _encode_png(image), "label": int(label)}


class _MnistFromIdx(_FromIdxArrays, tfds_mnist.MNIST, skip_registration=True):
    name = "mnist"


class _FashionMnistFromIdx(
    _FromIdxArrays, tfds_mnist.FashionMNIST, skip_registration=True
):
    name = "fashion_mnist"


_IDX_BUILDERS = {"mnist": _MnistFromIdx, "fashion_mnist": _FashionMnistFromIdx}


def prepare(
    name: str, source_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> dict:
    """Builds the canonical TFDS dataset `name` from IDX files, with no network.

    Reuses a dataset already prepared in `data_dir`. Then checks that
    `tfds.data_source` finds every split holding exactly the IDX files' (image,
    label) pairs; the order is TFDS's (see the module docstring).

    Args:
      name: "fashion_mnist" or "mnist".
      source_dir: folder with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
        t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or unzipped).
      data_dir: TFDS data directory; default `default_data_dir()`.

    Returns:
      dict(name, version, data_dir, path, num_examples={split: count}).
    """
    if name not in _IDX_BUILDERS:
        raise ValueError(
            f"expected one of {sorted(_IDX_BUILDERS)} to prepare from IDX files, "
            f"got {name!r}; other datasets come from TFDS. "
            + _tfds_instructions(name, "DATA_DIR")
        )
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    splits = _read_idx_splits(pathlib.Path(source_dir))

    builder = _IDX_BUILDERS[name](
        splits=splits, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )

    counts = {}
    for split, (images, labels) in splits.items():
        stored = load_source(name, split, data_dir, in_memory=True)
        if not _same_examples(stored.images, stored.labels, images, labels):
            raise RuntimeError(
                f"expected {name} {split} in {builder.data_dir} to hold the IDX "
                "files' (image, label) pairs, in any order, got others; delete "
                "that folder and prepare again"
            )
        counts[split] = len(stored)
    return {
        "name": name,
        "version": str(builder.version),
        "data_dir": data_dir,
        "path": os.fspath(builder.data_dir),
        "num_examples": counts,
    }


# ---------------------------------------------------------------------------
# Random-access sources.


class ArraySource:
    """In-memory examples as a random-access source.

    Args:
      images: (count, H, W, C) uint8.
      labels: (count,) integers.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"expected images of shape (count, H, W, C) and dtype uint8, got "
                f"{images.shape} {images.dtype}; add a channel axis or cast"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected labels of shape {images.shape[:1]}, got {labels.shape}"
            )
        self.images, self.labels = images, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


class TfdsSource:
    """A TFDS random-access split giving `dict(image=uint8 (H, W, C), label=int)`."""

    def __init__(self, data_source: Sequence[dict]):
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict:
        return _image_and_label(self.data_source[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        examples = self.data_source.__getitems__([int(i) for i in indices])
        return [_image_and_label(example) for example in examples]

    def __repr__(self) -> str:
        return f"TfdsSource({self.data_source!r})"


def _image_and_label(example: dict) -> dict:
    return {"image": example["image"], "label": int(example["label"])}


def _tfds_instructions(name: str, data_dir: str) -> str:
    if name == "imagenet2012":
        return (
            "ImageNet needs a manual download. Register at "
            "https://image-net.org/download-images, put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in {data_dir}/downloads/manual/, then run (with "
            "TensorFlow installed)\n"
            f"  tfds build imagenet2012 --data_dir={data_dir}"
            " --file_format=array_record"
        )
    return (
        f"TFDS downloads {name}, which needs internet and TensorFlow; on such a "
        f"machine run\n  tfds build {name} --data_dir=DIR --file_format=array_record\n"
        f"and copy DIR/{name} to {data_dir}/{name} here"
    )


def _missing_message(name: str, data_dir: str, path: str, formats: set) -> str:
    where = f"{name} is not prepared in {data_dir} (looked for {path})."
    if formats:  # e.g. tfds.load with TensorFlow wrote tfrecord
        where = (
            f"{name} is prepared in {path} as {sorted(formats)}, but random access "
            "needs array_record."
        )
    flag = "" if data_dir == default_data_dir() else f" --data-dir {data_dir}"
    if name == "fashion_mnist":
        return (
            f"{where} Build it from Debian's copy of the original files, offline:\n"
            "  apt-get install dataset-fashion-mnist\n"
            "  dnl-zoo data prepare fashion_mnist"
            f" --source {DEBIAN_FASHION_MNIST}{flag}"
        )
    if name == "mnist":
        files = ", ".join(
            f"{stem}.gz" for stems in IDX_FILES.values() for stem in stems
        )
        return (
            f"{where} Put the original IDX files ({files}) in a folder DIR and run, "
            f"offline:\n  dnl-zoo data prepare mnist --source DIR{flag}"
        )
    return f"{where} {_tfds_instructions(name, data_dir)}"


def _prepared_formats(builder) -> set[str]:
    """The file formats `builder`'s prepared data has (none if unprepared)."""
    if not builder.is_prepared():
        return set()
    return {str(f.value) for f in builder.info.available_file_formats()}


def load_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    in_memory: bool | None = None,
) -> TfdsSource | ArraySource:
    """Opens a prepared TFDS split as a random-access source, with no network.

    Args:
      name: a key of `DATASETS`.
      split: a TFDS split, e.g. "train", "test", "train[:90%]".
      data_dir: TFDS data directory; default `default_data_dir()`.
      in_memory: read the whole split into an `ArraySource` first, so that a
        batch is a gather rather than PNG decoding (Fashion-MNIST train: 4 s
        once, then 0.5 ms instead of 13 ms a batch of 128). None: when the images
        have a fixed shape and take under 1 GiB.

    Raises:
      DataNotFoundError: the dataset is not prepared as array_record in `data_dir`;
        the message gives the command that prepares it.
    """
    if name not in DATASETS:
        raise ValueError(f"expected a dataset in {sorted(DATASETS)}, got {name!r}")
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    builder = tfds.builder(name, data_dir=data_dir)
    found = _prepared_formats(builder)
    if "array_record" not in found:
        path = os.fspath(builder.data_dir)
        raise DataNotFoundError(_missing_message(name, data_dir, path, found))
    if split.split("[")[0] not in builder.info.splits:
        raise ValueError(
            f"expected a split of {name} in {sorted(builder.info.splits)}, "
            f"got {split!r}"
        )

    source = TfdsSource(
        tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    )
    shape = builder.info.features["image"].shape
    fixed = None not in shape
    if in_memory is None:
        in_memory = fixed and len(source) * math.prod(shape) < _IN_MEMORY_BYTES
    if not in_memory:
        return source
    if not fixed:
        raise ValueError(f"expected images of one shape for in_memory, got {shape}")
    chunks = [range(i, min(i + 4096, len(source))) for i in range(0, len(source), 4096)]
    images = np.empty((len(source), *shape), np.uint8)
    labels = np.empty(len(source), np.int64)
    for chunk in tqdm.tqdm(chunks, desc=f"reading {name} {split}"):
        for index, example in zip(chunk, source.__getitems__(chunk), strict=True):
            images[index], labels[index] = example["image"], example["label"]
    return ArraySource(images, labels)


def download(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Downloads and prepares `name` with TFDS (needs the internet, e.g. Colab).

    Machines without a network use `prepare` from local files instead. Returns
    the data_dir the dataset is in.
    """
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    builder = tfds.builder(name, data_dir=data_dir)
    if "array_record" not in _prepared_formats(builder):
        builder.download_and_prepare(file_format="array_record")
    return data_dir


def dataset_version(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The TFDS version of `name` as prepared in `data_dir`, e.g. '3.0.1'."""
    data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
    return str(tfds.builder(name, data_dir=data_dir).info.version)


# ---------------------------------------------------------------------------
# Augmentation: NumPy, vectorised per batch; `u` holds uniform draws in [0, 1).

_PAD = {"cifar": 4, "fashion_mnist": 2}  # zero padding before the random crop
_CROP, _RESIZE = 224, 256  # ImageNet: train crop size; eval resize before centre crop
_MIN_AREA, _RATIOS, _TRIES = 0.08, (3 / 4, 4 / 3), 10  # Inception-style crops
# Uniform draws per example: crop offsets, flip (ImageNet: areas, ratios first).
_NUM_DRAWS = {"cifar": 3, "fashion_mnist": 3, "imagenet": 2 * _TRIES + 3, None: 0}


def pad_crop_flip(images: np.ndarray, pad: int, u: np.ndarray) -> np.ndarray:
    """Random crop from zero-padded images, then random horizontal flip.

    Args:
      images: (batch, H, W, C) uint8.
      pad: pixels of zero padding on each side.
      u: (batch, 3) uniform: row offset, column offset, flip (< 0.5).

    Returns:
      (batch, H, W, C) uint8.
    """
    batch, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    top = (u[:, 0] * (2 * pad + 1)).astype(np.intp)
    left = (u[:, 1] * (2 * pad + 1)).astype(np.intp)
    columns = np.where(u[:, 2:3] < 0.5, np.arange(width)[::-1], np.arange(width))
    rows = top[:, None] + np.arange(height)  # (batch, H)
    columns = left[:, None] + columns  # (batch, W)
    return padded[
        np.arange(batch)[:, None, None], rows[:, :, None], columns[:, None, :]
    ]


def random_boxes(sizes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inception-style random crops: 8-100% of the area, aspect ratio 3/4 to 4/3.

    Takes the first of 10 tries that fits; else the whole image, its ratio clamped.

    Args:
      sizes: (batch, 2) image heights and widths.
      u: (batch, 2 * 10 + 2) uniform: areas, log ratios, row and column offsets.

    Returns:
      (batch, 4) integer boxes: top, left, height, width.
    """
    height, width = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)
    area = height * width * (_MIN_AREA + (1 - _MIN_AREA) * u[:, :_TRIES])
    low, high = np.log(_RATIOS)
    ratio = np.exp(low + (high - low) * u[:, _TRIES : 2 * _TRIES])  # width / height
    box_w, box_h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (box_w >= 1) & (box_h >= 1) & (box_w <= width) & (box_h <= height)
    first = np.arange(len(sizes)), fits.argmax(axis=1)
    box_h, box_w = box_h[first], box_w[first]
    height, width = height[:, 0], width[:, 0]

    clamped = np.clip(width / height, *_RATIOS)
    whole_h = np.minimum(height, np.round(width / clamped))
    whole_w = np.minimum(width, np.round(height * clamped))
    found = fits.any(axis=1)
    box_h, box_w = np.where(found, box_h, whole_h), np.where(found, box_w, whole_w)
    top = np.where(
        found, np.floor(u[:, -2] * (height - box_h + 1)), (height - box_h) // 2
    )
    left = np.where(
        found, np.floor(u[:, -1] * (width - box_w + 1)), (width - box_w) // 2
    )
    return np.stack([top, left, box_h, box_w], axis=1).astype(np.intp)


def resize_box(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """Bilinear resampling of a box of one image onto a size x size grid.

    No antialiasing, as `tf.image.resize`'s default in reference pipelines.

    Args:
      image: (h, w, C) uint8.
      box: top, left, height, width in pixels (may be fractional).

    Returns:
      (size, size, C) float32 pixel values in [0, 255].
    """
    top, left, box_h, box_w = box
    y0, y1, wy = _taps(
        top + (np.arange(size) + 0.5) * box_h / size - 0.5, image.shape[0]
    )
    x0, x1, wx = _taps(
        left + (np.arange(size) + 0.5) * box_w / size - 0.5, image.shape[1]
    )
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def _taps(coords: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coords = np.clip(coords, 0, length - 1)
    low = np.floor(coords).astype(np.intp)
    return low, np.minimum(low + 1, length - 1), (coords - low).astype(np.float32)


def centre_box(height: int, width: int) -> tuple[float, float, float, float]:
    """The box of "resize the short side to 256, centre crop 224", in source pixels."""
    side = min(height, width) * _CROP / _RESIZE
    return (height - side) / 2, (width - side) / 2, side, side


# ---------------------------------------------------------------------------
# The pipeline.


class Loader:
    """Deterministic, resumable batches of one source for one process.

    Train: epoch e visits the examples in a permutation drawn from (seed, e);
    global batch `step` is the slice `step mod steps_per_epoch` of it, dropping
    the remainder. Augmentation draws come from (seed, step), one row per example
    of the global batch. Process p takes rows [p * b, (p + 1) * b) with
    b = global_batch_size / process_count, so the processes' batches concatenate
    to the single-process batch.

    Args:
      source: len() and [index] -> dict(image=uint8 (H, W, C), label=int).
      global_batch_size: examples per step over all processes.
      seed: non-negative integer.
      train: `batch(step)` with random augmentation, else `eval_batches()`.
      augment: "cifar" (4-pixel zero padding, random crop, horizontal flip),
        "fashion_mnist" (2-pixel padding, crop, flip), "imagenet" (train: random
        resized crop 224 and flip; eval: resize 256, centre crop 224) or None.
        Only "imagenet" changes eval images.
      mean, std: per channel on the [0, 1] scale (pixel / 255), or scalars.
      process_index, process_count: this process and how many share each batch.
    """

    def __init__(
        self,
        source: Sequence[dict],
        *,
        global_batch_size: int,
        seed: int,
        train: bool,
        augment: str | None,
        mean: Sequence[float] | float,
        std: Sequence[float] | float,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                "expected a global_batch_size divisible by "
                f"process_count={process_count}, got {global_batch_size}; use a "
                f"multiple of {process_count}, e.g. "
                f"{max(1, round(global_batch_size / process_count)) * process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(
                f"expected process_index in [0, {process_count}), got {process_index}"
            )
        if augment not in _NUM_DRAWS:
            raise ValueError(f"expected augment in {list(_NUM_DRAWS)}, got {augment!r}")
        if seed < 0:
            raise ValueError(f"expected a non-negative seed, got {seed}")
        self.source, self.seed, self.train, self.augment = source, seed, train, augment
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.num_examples = len(source)
        if train and self.num_examples < global_batch_size:
            raise ValueError(
                f"expected at least global_batch_size={global_batch_size} examples to "
                f"train on, got {self.num_examples}; use a smaller batch"
            )
        # train drops the remainder; eval pads the last batch
        self.steps_per_epoch = (
            self.num_examples // global_batch_size
            if train
            else -(-self.num_examples // global_batch_size)
        )

        first = np.asarray(source[0]["image"])
        channels = first.shape[-1]
        self.image_shape = (
            (_CROP, _CROP, channels) if augment == "imagenet" else first.shape
        )
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if mean.size not in (1, channels) or std.size not in (1, channels):
            raise ValueError(
                f"expected mean and std of 1 or {channels} values for images of shape "
                f"{first.shape}, got {mean.tolist()} and {std.tolist()}"
            )
        self._scale = (1 / (255 * std)).reshape(-1)
        self._offset = (-mean / std).reshape(-1)
        self._permutation = (None, None)  # (epoch, order), one epoch cached

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `step`.

        Returns:
          image: (local_batch_size, H, W, C) float32, normalised.
          label: (local_batch_size,) int32.
        """
        if not self.train:
            raise ValueError(
                "expected a Loader with train=True for batch(); use eval_batches()"
            )
        if step < 0:
            raise ValueError(f"expected a non-negative step, got {step}")
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        indices = self._epoch_order(epoch)[start : start + self.global_batch_size]
        rng = np.random.default_rng([self.seed, 1, step])
        u = rng.random((self.global_batch_size, _NUM_DRAWS[self.augment]))

        mine = slice(
            self.process_index * self.local_batch_size,
            (self.process_index + 1) * self.local_batch_size,
        )
        images, labels = _read(self.source, indices[mine])
        if self.augment in _PAD:
            images = pad_crop_flip(_stack(images), _PAD[self.augment], u[mine])
        elif self.augment == "imagenet":
            images = _random_resized_crops(images, u[mine])
        return {"image": self._normalise(_stack(images)), "label": labels}

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order; the last batch padded with zeros.

        Yields:
          image: (local_batch_size, H, W, C) float32, normalised.
          label: (local_batch_size,) int32.
          mask: (local_batch_size,) bool, True for real examples.
        """
        if self.train:
            raise ValueError("expected a Loader with train=False for eval_batches()")
        for step in range(self.steps_per_epoch):
            positions = (
                step * self.global_batch_size
                + self.process_index * self.local_batch_size
                + np.arange(self.local_batch_size)
            )
            mask = positions < self.num_examples
            image = np.zeros((self.local_batch_size, *self.image_shape), np.float32)
            label = np.zeros(self.local_batch_size, np.int32)
            if mask.any():
                images, labels = _read(self.source, positions[mask])
                if self.augment == "imagenet":
                    images = [
                        resize_box(x, centre_box(*x.shape[:2]), _CROP) for x in images
                    ]
                image[mask], label[mask] = self._normalise(_stack(images)), labels
            yield {"image": image, "label": label, "mask": mask}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, 0, epoch])
            self._permutation = (epoch, rng.permutation(self.num_examples))
        return self._permutation[1]

    def _normalise(self, images: np.ndarray) -> np.ndarray:
        return images.astype(np.float32) * self._scale + self._offset


def _read(
    source: Sequence[dict], indices: np.ndarray
) -> tuple[list | np.ndarray, np.ndarray]:
    """Images (an array for `ArraySource`, else a list) and (n,) int32 labels."""
    if isinstance(source, ArraySource):
        return source.images[indices], source.labels[indices].astype(np.int32)
    read_many = getattr(source, "__getitems__", None)
    examples = read_many(indices) if read_many else [source[int(i)] for i in indices]
    images = [np.asarray(example["image"]) for example in examples]
    return images, np.array([example["label"] for example in examples], np.int32)


def _stack(images: list | np.ndarray) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"expected images of one shape to batch, got {sorted(shapes)[:3]}...; "
            "use augment='imagenet', which crops every image to 224 x 224"
        )
    return np.stack(images)


def _random_resized_crops(images: list | np.ndarray, u: np.ndarray) -> np.ndarray:
    """Images of any sizes, u: (n, 23) -> (n, 224, 224, C) float32, flipped."""
    boxes = random_boxes(np.array([image.shape[:2] for image in images]), u[:, :-1])
    crops = np.stack(
        [resize_box(x, box, _CROP) for x, box in zip(images, boxes, strict=True)]
    )
    return np.where((u[:, -1] < 0.5)[:, None, None, None], crops[:, :, ::-1], crops)
