"""Tests for dnl_zoo.data: offline TFDS preparation, sources, and the Loader.

The Fashion-MNIST tests use the TFDS dataset that conftest's `fashion_mnist_dir`
builds once per session from Debian's copy of the IDX files (`apt-get install
dataset-fashion-mnist`), and check it against the IDX files parsed here, with
every network connection refused.
"""

import gzip
import pathlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing

from dnl_zoo import data

SOURCE = pathlib.Path("/usr/share/datasets/fashion-mnist")
COUNTS = {"train": 60_000, "test": 10_000}


def _require_idx_files() -> None:
    files = [
        SOURCE / f"{stem}.gz" for stems in data.IDX_FILES.values() for stem in stems
    ]
    if not all(path.is_file() for path in files):
        pytest.fail(
            f"expected the IDX files {[p.name for p in files]} in {SOURCE}; "
            "run `apt-get install dataset-fashion-mnist`"
        )


def _idx(path: pathlib.Path, magic: int, header_bytes: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    assert int.from_bytes(raw[:4], "big") == magic, path
    return np.frombuffer(raw, np.uint8, offset=header_bytes)


def _idx_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (count, 28, 28, 1) and labels (count,) of one split, from IDX."""
    _require_idx_files()
    stem = {"train": "train", "test": "t10k"}[split]
    images = _idx(SOURCE / f"{stem}-images-idx3-ubyte.gz", 0x0803, 16)
    labels = _idx(SOURCE / f"{stem}-labels-idx1-ubyte.gz", 0x0801, 8)
    return images.reshape(-1, 28, 28, 1), labels


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Fails any test that opens a network connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a data test tried to reach the network: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def prepared(request, no_network) -> dict:
    """What `prepare` reports on the session's dataset, checking it once more."""
    _require_idx_files()
    data_dir = request.getfixturevalue("fashion_mnist_dir")  # built in conftest
    return data.prepare("fashion_mnist", SOURCE, data_dir)


def test_prepare_writes_the_canonical_tfds_dataset(prepared, tmp_path):
    assert prepared["name"] == "fashion_mnist"
    assert prepared["num_examples"] == COUNTS
    stored = tfds.builder("fashion_mnist", data_dir=prepared["data_dir"])
    canonical = tfds.builder_cls("fashion_mnist")(data_dir=tmp_path)
    assert stored.is_prepared() and not canonical.is_prepared()
    assert prepared["version"] == str(stored.version) == str(canonical.version)
    assert stored.info.features.to_json() == canonical.info.features.to_json()
    assert stored.info.features["image"].shape == (28, 28, 1)
    assert stored.info.features["image"].np_dtype == np.uint8
    assert stored.info.features["label"].num_classes == 10
    assert stored.info.supervised_keys == canonical.info.supervised_keys
    assert {k: v.num_examples for k, v in stored.info.splits.items()} == COUNTS

    sources = tfds.data_source(
        "fashion_mnist", data_dir=prepared["data_dir"], download=False
    )
    assert {split: len(source) for split, source in sources.items()} == COUNTS


@pytest.mark.parametrize("split", ["train", "test"])
def test_prepared_split_holds_the_idx_examples_in_tfds_order(prepared, split):
    images, labels = _idx_split(split)
    # TFDS writes examples sorted by the hash of their key (the IDX index, as
    # in the online builder) salted with the split name.
    hasher = hashing.Hasher(salt=split)
    order = np.argsort([hasher.hash_key(i) for i in range(len(labels))])

    source = data.load_source("fashion_mnist", split, prepared["data_dir"])
    assert isinstance(source, data.ArraySource)  # small enough for memory
    assert len(source) == COUNTS[split]
    np.testing.assert_array_equal(source.labels, labels[order])
    np.testing.assert_array_equal(source.images, images[order])
    assert np.bincount(source.labels).tolist() == [COUNTS[split] // 10] * 10

    lazy = data.load_source(
        "fashion_mnist", split, prepared["data_dir"], in_memory=False
    )
    for index in [0, 1, 4321, len(labels) - 1]:
        example = lazy[index]
        assert example["image"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], images[order[index]])
        assert example["label"] == labels[order[index]]
        assert type(example["label"]) is int


def test_prepare_without_idx_files_says_what_to_install(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="apt-get install dataset-fashion-mnist"
    ):
        data.prepare("fashion_mnist", tmp_path, tmp_path / "tfds")


@pytest.mark.parametrize(
    "name, command",
    [
        ("fashion_mnist", f"dnl-zoo data prepare fashion_mnist --source {SOURCE}"),
        ("mnist", "dnl-zoo data prepare mnist --source DIR"),
        ("cifar10", "tfds build cifar10 --data_dir=DIR --file_format=array_record"),
        ("imagenet2012", "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"),
    ],
)
def test_missing_dataset_names_the_command_that_prepares_it(tmp_path, name, command):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_source(name, "train", tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    assert command in str(error.value)
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert not any(tmp_path.iterdir())  # looking leaves nothing behind


# ---------------------------------------------------------------------------
# Loader, on tiny synthetic data where the pixels do not matter.


def _synthetic(count=96, shape=(8, 8, 3)) -> data.ArraySource:
    images = np.random.default_rng(0).integers(0, 256, (count, *shape), np.uint8)
    return data.ArraySource(images, np.arange(count))  # label = index


def _loader(source, **overrides) -> data.Loader:
    kwargs = dict(global_batch_size=16, seed=0, train=True, augment="cifar")
    kwargs.update(mean=0.5, std=0.25, **overrides)
    return data.Loader(source, **kwargs)


def test_batch_is_a_pure_function_of_seed_and_step():
    source = _synthetic()
    loader, resumed = _loader(source), _loader(source)
    for step in range(7):
        loader.batch(step)
    first, again = loader.batch(7), resumed.batch(7)  # resumed skips steps 0-6
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])
    assert not np.array_equal(first["label"], loader.batch(8)["label"])
    other_seed = _loader(source, seed=1).batch(7)
    assert not np.array_equal(first["label"], other_seed["label"])


def test_each_epoch_is_a_new_permutation_without_remainder():
    loader = _loader(_synthetic(count=100), augment=None)
    assert loader.steps_per_epoch == 100 // 16
    epochs = [
        np.concatenate([loader.batch(e * 6 + s)["label"] for s in range(6)])
        for e in range(2)
    ]
    for labels in epochs:
        assert len(np.unique(labels)) == 96 and labels.max() < 100
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_concatenate_to_the_global_batch(process_count):
    source = _synthetic()
    single = _loader(source).batch(11)
    shares = [
        _loader(source, process_index=p, process_count=process_count).batch(11)
        for p in range(process_count)
    ]
    assert shares[0]["image"].shape == (16 // process_count, 8, 8, 3)
    for key in ["image", "label"]:
        joined = np.concatenate([share[key] for share in shares])
        np.testing.assert_array_equal(joined, single[key])


def test_batch_shapes_dtypes_and_normalisation():
    images, labels = _idx_split("train")
    info = data.DATASETS["fashion_mnist"]
    assert info.mean[0] == pytest.approx(images.mean() / 255, abs=5e-4)
    assert info.std[0] == pytest.approx((images / 255).std(), abs=5e-4)
    loader = data.Loader(
        data.ArraySource(images, labels),
        global_batch_size=1024,
        seed=0,
        train=True,
        augment=None,
        mean=info.mean,
        std=info.std,
    )
    batch = loader.batch(0)
    assert batch["image"].shape == (1024, 28, 28, 1)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert abs(batch["image"].mean()) < 0.1
    assert abs(batch["image"].std() - 1) < 0.1


@pytest.mark.parametrize("augment, pad", [("cifar", 4), ("fashion_mnist", 2)])
def test_augmentation_is_a_crop_of_the_padded_image_maybe_flipped(augment, pad):
    source = _synthetic(shape=(8, 8, 1) if augment == "fashion_mnist" else (8, 8, 3))
    plain = _loader(source, augment=None).batch(3)
    augmented = _loader(source, augment=augment).batch(3)
    assert augmented["image"].shape == plain["image"].shape
    np.testing.assert_array_equal(augmented["label"], plain["label"])
    assert not np.allclose(augmented["image"], plain["image"])

    pixels = np.round(augmented["image"] * 0.25 * 255 + 0.5 * 255).astype(np.uint8)
    for image, label in zip(pixels, augmented["label"], strict=True):
        padded = np.pad(source.images[label], ((pad, pad), (pad, pad), (0, 0)))
        crops = []
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                crop = padded[top : top + 8, left : left + 8]
                crops += [crop, crop[:, ::-1]]
        assert any(np.array_equal(image, crop) for crop in crops)


def test_imagenet_crops_images_of_any_size_to_224():
    rng = np.random.default_rng(0)
    sizes = [(300, 200), (180, 400), (224, 224), (500, 375)]
    source = [
        {"image": rng.integers(0, 256, (*size, 3), np.uint8), "label": i}
        for i, size in enumerate(sizes)
    ]
    common = dict(global_batch_size=4, seed=0, augment="imagenet", mean=0.5, std=0.25)
    batch = data.Loader(source, train=True, **common).batch(0)
    assert batch["image"].shape == (4, 224, 224, 3)
    assert np.isfinite(batch["image"]).all()
    (evaluated,) = data.Loader(source, train=False, **common).eval_batches()
    assert evaluated["image"].shape == (4, 224, 224, 3) and evaluated["mask"].all()

    boxes = data.random_boxes(np.array([[300, 200]] * 1000), rng.random((1000, 22)))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 300).all() and (left + width <= 200).all()
    assert (height * width >= 0.07 * 300 * 200).all()
    assert (width / height > 0.72).all() and (width / height < 1.39).all()


def test_resize_box_of_a_same_size_box_returns_the_pixels():
    image = np.random.default_rng(0).integers(0, 256, (256, 320, 3), np.uint8)
    assert data.centre_box(256, 320) == (16, 48, 224, 224)
    centre = data.resize_box(image, data.centre_box(256, 320), 224)
    np.testing.assert_allclose(centre, image[16:240, 48:272], atol=1e-4)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once_in_order(process_count):
    source = _synthetic(count=100)
    loaders = [
        _loader(source, train=False, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    assert loaders[0].steps_per_epoch == 7  # ceil(100 / 16)
    seen = []
    for shares in zip(*(loader.eval_batches() for loader in loaders), strict=True):
        for share in shares:
            assert share["image"].shape == (16 // process_count, 8, 8, 3)
            assert share["mask"].dtype == np.bool_
            seen.extend(share["label"][share["mask"]])
    assert seen == list(range(100))


def test_indivisible_global_batch_says_so():
    with pytest.raises(ValueError, match="divisible by process_count=3.*multiple of 3"):
        _loader(_synthetic(), global_batch_size=16, process_count=3)
