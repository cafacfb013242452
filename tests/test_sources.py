"""Host sources (ImageFolder, digits, TFDS) and the grain pipeline that turns them into global batches."""

import importlib.metadata
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from onepfrac_jax.config import ConfigError
from onepfrac_jax.data import pipeline, sources

# Each class's images are one flat colour, so a decoded image tells which class folder it came from.
COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (90, 90, 90)}


def _save(path: Path, colour, size, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    value = colour[0] if mode == "L" else colour
    Image.new(mode, size, value).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{train,val}/<class>/...: PNG and JPEG of several sizes, grayscale, RGBA, nested, non-images."""
    root = tmp_path / "data"
    train = root / "train"
    _save(train / "bee" / "b1.png", COLOURS["bee"], (10, 7))
    _save(train / "bee" / "b0.JPG", COLOURS["bee"], (31, 17))
    _save(train / "bee" / "sub" / "b2.png", COLOURS["bee"], (5, 5), "RGBA")
    _save(train / "ant" / "a0.jpeg", COLOURS["ant"], (40, 30))
    _save(train / "ant" / "a1.bmp", COLOURS["ant"], (12, 12))
    _save(train / "cat" / "c0.png", COLOURS["cat"], (9, 13), "L")
    (train / "cat" / "notes.txt").write_text("not an image")
    (train / "stray.png").write_bytes(b"files beside the class folders are ignored")
    _save(root / "val" / "cat" / "v0.png", COLOURS["cat"], (20, 20), "L")
    _save(root / "val" / "bee" / "v1.png", COLOURS["bee"], (20, 20))
    return root


def test_imagefolder_labels_follow_sorted_class_names_and_images_are_fixed_size(tree):
    source = sources.ImageFolderSource(tree / "train", image_size=12)
    assert source.class_names == ("ant", "bee", "cat") and source.num_classes == 3
    assert [p.name for p in source.paths] == ["a0.jpeg", "a1.bmp", "b0.JPG", "b1.png", "b2.png", "c0.png"]
    assert len(source) == 6
    for i in range(len(source)):
        item = source[i]
        image, name = item["image"], source.class_names[item["label"]]
        assert image.shape == (12, 12, 3) and image.dtype == np.uint8
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), COLOURS[name], atol=3)
    grey = source[5]["image"]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_imagefolder_val_split_keeps_train_labels(tree):
    section = ml_collections.ConfigDict({"name": "imagefolder", "data_dir": str(tree), "image_size": 8})
    val = sources.make_source(section, "val")
    assert val.class_names == ("ant", "bee", "cat")
    assert [val[i]["label"] for i in range(len(val))] == [1, 2]
    (tree / "val" / "dog").mkdir()
    _save(tree / "val" / "dog" / "d.png", (1, 2, 3), (4, 4))
    with pytest.raises(ConfigError, match="dog"):
        sources.make_source(section, "val")


@pytest.mark.parametrize(
    ("breakage", "names"),
    [
        ("missing", "nowhere"),
        ("empty", "train"),
        ("class_without_images", "cat"),
    ],
)
def test_imagefolder_bad_trees_name_the_path(tree, breakage, names):
    root = tree / "train"
    if breakage == "missing":
        root = tree / "nowhere"
    elif breakage == "empty":
        for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
            path.rmdir() if path.is_dir() else path.unlink()
    else:
        (root / "cat" / "c0.png").unlink()
    with pytest.raises(ConfigError, match=names):
        sources.ImageFolderSource(root, image_size=8)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_raises_on_read_naming_the_file(tree, damage):
    bad = tree / "train" / "ant" / "a2.png"
    if damage == "garbage":
        bad.write_bytes(b"\x89PNG but not really")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:400])
    source = sources.ImageFolderSource(tree / "train", image_size=8)
    position = [p.name for p in source.paths].index("a2.png")
    assert source[0]["label"] == 0  # the good files still read
    with pytest.raises(ConfigError, match=r"a2\.png"):
        source[position]
    with pytest.raises(ConfigError, match=r"^1 of 7 images under .*train cannot be decoded: .*a2\.png[^;]*$"):
        sources.verify_source(source, max_files=100, num_threads=2)
    # Through the threaded grain pipeline the error still names the file.
    dataset = pipeline.eval_dataset(source, global_batch=len(source), rows=np.arange(len(source)))
    with pytest.raises(ConfigError, match=r"a2\.png"):
        next(pipeline.host_iterator(dataset))


@pytest.mark.parametrize(
    ("link", "target", "error"),
    [
        ("ant/loop", "..", r"ant/loop -> \S*/train is a loop"),
        ("ant/sub", "../ant", r"ant/sub -> \S*/train/ant is a loop"),
        ("bee/deeper/up", "..", r"bee/deeper/up -> \S*/train/bee is a loop"),
        # A link to a class read later, and one to a class read earlier: the same folder in two classes.
        ("ant/bees", "../bee", r"ant/bees -> \S*/train/bee makes one folder read twice: as \S*/train/ant/bees "
                               r"\(class 'ant'\) and as \S*/train/bee \(class 'bee'\)"),
        ("cat/ants", "../ant", r"cat/ants -> \S*/train/ant makes one folder read twice: as \S*/train/ant "
                               r"\(class 'ant'\) and as \S*/train/cat/ants \(class 'cat'\)"),
        ("dog", "cat", r"train/dog -> \S*/train/cat makes one folder read twice"),
    ],
)
def test_symlinked_folders_read_twice_are_errors_naming_the_link(tree, link, target, error):
    path = tree / "train" / link
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=True)
    with pytest.raises(ConfigError, match=error) as err:
        sources.ImageFolderSource(tree / "train", image_size=8)
    assert "\n" not in str(err.value)


def test_symlinks_to_outside_folders_and_to_files_are_followed(tree, tmp_path):
    outside = tmp_path / "elsewhere"
    _save(outside / "more" / "m0.png", COLOURS["ant"], (6, 6))
    _save(outside / "more" / "m1.png", COLOURS["ant"], (6, 6))
    (tree / "train" / "ant" / "linked").symlink_to(outside / "more", target_is_directory=True)
    # A file link is just another image, even one into another class's folder.
    (tree / "train" / "ant" / "copy.png").symlink_to(tree / "train" / "bee" / "b1.png")
    source = sources.ImageFolderSource(tree / "train", image_size=8)
    ant = [str(p.relative_to(tree / "train")) for p, label in zip(source.paths, source.labels, strict=True)
           if label == 0]
    assert ant == ["ant/a0.jpeg", "ant/a1.bmp", "ant/copy.png", "ant/linked/m0.png", "ant/linked/m1.png"]
    assert len(source) == 9
    np.testing.assert_allclose(source[2]["image"].reshape(-1, 3).mean(0), COLOURS["bee"], atol=3)


_SIXTEEN_BIT = np.random.default_rng(0).integers(0, 65536, (9, 8), dtype=np.uint16)


def _write_pgm(path: Path, values: np.ndarray) -> None:
    header = f"P5 {values.shape[1]} {values.shape[0]} 65535\n".encode()
    path.write_bytes(header + values.astype(">u2").tobytes())


@pytest.mark.parametrize(
    ("name", "write", "mode"),
    [
        ("png", lambda path: Image.fromarray(_SIXTEEN_BIT).save(path), "I;16"),
        ("tif", lambda path: Image.fromarray(_SIXTEEN_BIT.astype(">u2")).save(path), "I;16B"),
        ("tif", lambda path: Image.fromarray(_SIXTEEN_BIT.astype(np.int32)).save(path), "I"),
        ("pgm", lambda path: _write_pgm(path, _SIXTEEN_BIT), "I"),
    ],
)
def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path, name, write, mode):
    path = tmp_path / f"image.{name}"
    write(path)
    with Image.open(path) as image:
        assert image.mode == mode
    decoded = sources.decode_image_file(path, size=8)[:, :8]  # width 8 is kept; rows are resized 9 → 8
    expected = np.asarray(Image.fromarray((_SIXTEEN_BIT >> 8).astype(np.uint8)).resize((8, 8), Image.BICUBIC))
    np.testing.assert_array_equal(decoded, np.repeat(expected[:, :, None], 3, axis=2))
    assert decoded.max() < 255 and decoded.mean() > 100  # not clipped to white as Pillow's convert does


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (_SIXTEEN_BIT.astype(np.float32) / 65535, r"float32 pixels in \S+ are not supported"),
        (np.arange(72, dtype=np.int32).reshape(9, 8) - 7, r"int32 pixels in -7\.\.64 are not supported"),
    ],
)
def test_float_and_out_of_range_images_are_refused_naming_the_file(tmp_path, values, error):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ConfigError, match=rf"cannot decode image \S*odd\.tif: {error}"):
        sources.decode_image_file(path, size=8)


def test_tfds_uint16_images_are_scaled_to_eight_bits():
    # tfds decodes uint16 images only with OpenCV; what reaches the source is then a uint16 array.
    source = sources.TfdsSource.__new__(sources.TfdsSource)
    source.image_size = 3
    source._data = [{"image": np.full((3, 3, 1), 40000, np.uint16), "label": 1},
                    {"image": np.full((3, 3, 3), 513, np.uint16), "label": 0}]
    assert (source[0]["image"] == 40000 >> 8).all() and (source[1]["image"] == 2).all()


def _break(path: Path, damage: str) -> None:
    if damage == "garbage":
        path.write_bytes(b"\x89PNG but not really")
    elif damage == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])
    else:
        Image.fromarray(np.ones((4, 4), np.float32)).save(path, format="TIFF")


def test_verify_source_names_the_first_bad_files_and_counts_the_rest(tree, caplog):
    caplog.set_level("INFO")
    for i, damage in enumerate(["garbage", "truncated", "float", "garbage", "truncated"]):
        _break(tree / "train" / "bee" / f"bad{i}.png", damage)
    source = sources.ImageFolderSource(tree / "train", image_size=8)
    with pytest.raises(ConfigError) as err:
        sources.verify_source(source, max_files=len(source), num_threads=3)
    message = str(err.value)
    assert message.startswith(f"5 of 11 images under {tree / 'train'} cannot be decoded: cannot decode image ")
    assert [name in message for name in (f"bad{i}.png" for i in range(5))] == [True] * 3 + [False] * 2
    assert "float32 pixels" in message and message.endswith(" and 2 more") and "\n" not in message
    assert "verified 11 images" in caplog.text and "files/s, 3 threads" in caplog.text


def test_verify_logs_progress_and_passes_a_good_tree(tree, caplog):
    caplog.set_level("INFO")
    for i in range(150):  # three chunks of files, so three progress lines
        _save(tree / "train" / "cat" / f"extra{i:03d}.png", COLOURS["cat"], (4, 4), "L")
    source = sources.ImageFolderSource(tree / "train", image_size=8)
    source.verify(num_threads=2, log_every_s=0.0)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("verifying")]
    assert len(progress) == 3 and re.fullmatch(r"verifying \S*train: 156/156 images, \d+ files/s, 0 s left",
                                               progress[-1])


def test_verify_source_skips_large_trees_and_non_file_sources(tree, caplog, monkeypatch):
    caplog.set_level("INFO")
    decoded = []
    monkeypatch.setattr(sources, "_open_rgb", lambda path, size: decoded.append(path))
    source = sources.ImageFolderSource(tree / "train", image_size=8)
    sources.verify_source(source, max_files=len(source) - 1, num_threads=2)
    sources.verify_source(source, max_files=0, num_threads=2)
    assert not decoded and caplog.text.count(f"not checking the 6 images under {tree / 'train'}") == 2
    sources.verify_source(source, max_files=len(source), num_threads=2)
    assert sorted(decoded) == sorted(source.paths)
    sources.verify_source(sources.DigitsSource("val", 8), max_files=10**9, num_threads=2)
    assert len(decoded) == len(source) and "verified 6 images" in caplog.text
    with pytest.raises(ConfigError, match=r"data\.verify_max_files=-1 must be >= 0"):
        sources.verify_source(source, max_files=-1, num_threads=2)


def test_fraction_is_a_deterministic_per_class_prefix(tmp_path):
    for c, count in (("x", 10), ("y", 3)):
        for i in range(count):
            _save(tmp_path / c / f"{i:02d}.png", (i, i, i), (4, 4))
    subset = sources.ImageFolderSource(tmp_path, image_size=4, fraction=0.25)
    kept = [f"{p.parent.name}/{p.name}" for p in subset.paths]
    assert kept == ["x/00.png", "x/01.png", "x/02.png", "y/00.png"]
    assert subset.labels.tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(sources.per_class_subset([1, 0, 1, 1, 0, 2], 0.5), [0, 1, 2, 5])
    with pytest.raises(ConfigError, match="fraction"):
        sources.per_class_subset([0, 1], 0.0)


def test_make_source_fraction_applies_to_train_only_and_unknown_names_fail():
    section = ml_collections.ConfigDict({"name": "digits", "image_size": 8, "fraction": 0.1})
    train, val = sources.make_source(section, "train"), sources.make_source(section, "val")
    per_class = np.bincount(sources.DigitsSource("train", 8).labels)
    assert len(train) == sum(np.ceil(per_class / 10).astype(int))
    assert len(val) == len(sources.DigitsSource("val", 8))
    section.name = "cifar"
    with pytest.raises(ConfigError, match=r"imagefolder, tfds:<name>, digits"):
        sources.make_source(section, "train")
    with pytest.raises(ConfigError, match="splits are train, val"):
        sources.DigitsSource("test", 8)


def test_the_default_install_reads_tfds_and_names_the_build_command(tmp_path):
    """configs/finetune.py's default, tfds:cifar100, after the README's first install: the build command, no
    ImportError (tensorflow-datasets is a dependency of the package itself, not of an extra)."""
    requires = importlib.metadata.requires("onepfrac-jax")
    assert any(r.startswith("tensorflow-datasets") and "extra" not in r for r in requires)
    section = ml_collections.ConfigDict({"name": "tfds:cifar100", "image_size": 32, "data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="tfds build cifar100 --file_format=array_record"):
        sources.make_source(section, "train")


def test_digits_are_uint8_rgb_with_ten_classes_read_as_scikit_learn_reads_them():
    from sklearn.datasets import load_digits

    train, val = sources.DigitsSource("train", 16), sources.DigitsSource("val", 16)
    # read from scikit-learn's file without importing it: the same images and labels as its own loader
    digits = load_digits()
    assert (np.concatenate([train.labels, val.labels]) == digits.target).all()
    scaled = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    assert (np.concatenate([train.images, val.images]) == scaled).all()
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.num_classes == 10 and set(val.labels.tolist()) == set(range(10))
    images = np.stack([train[i]["image"] for i in range(50)])
    assert images.shape == (50, 16, 16, 3) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert (images[..., 0] == images[..., 2]).all()


def test_without_scikit_learn_the_bundled_sets_name_the_install(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    for source in (sources.DigitsSource, sources.PhotoCropsSource):
        with pytest.raises(ConfigError, match="pip install scikit-learn"):
            source("train", 8)


def test_photo_crops_are_keyed_crops_of_the_bundled_photos_with_no_val_pixel_seen_in_training():
    from sklearn.datasets import load_sample_images

    section = ml_collections.ConfigDict({"name": "photo_crops", "image_size": 16})
    train, val = (sources.make_source(section, split) for split in ("train", "val"))
    rows, cols = sources.PHOTO_GRID
    assert train.num_classes == val.num_classes == 2 * rows * cols
    assert train.class_names[:2] == ("china-0-0", "china-0-1")
    assert train.class_names[-1] == f"flower-{rows - 1}-{cols - 1}"
    assert (len(train), len(val)) == (1920, 480)
    assert np.bincount(val.labels).tolist() == [12] * val.num_classes
    item = train[100]
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.uint8
    # the same set on every construction (a keyed draw), and the pixels are the photo's box, resized
    again = sources.PhotoCropsSource("train", 16)
    assert (again.images == train.images).all() and (again.boxes == train.boxes).all()
    photo, top, left, side = train.boxes[100]
    expected = Image.fromarray(load_sample_images().images[photo][top : top + side, left : left + side])
    assert (item["image"] == np.asarray(expected.resize((16, 16), Image.Resampling.BICUBIC))).all()
    # every crop inside its class's region, train in the region's left half, val in its right half
    height, width = 427 // rows, 640 // cols
    for source, half in ((train, 0), (val, 1)):
        label = source.labels
        photo, top, left, side = source.boxes.T
        assert (photo == label // (rows * cols)).all() and (side >= 40).all()
        r, c = (label % (rows * cols)) // cols, label % cols
        assert (top >= r * height).all() and (top + side <= (r + 1) * height).all()
        assert (left >= c * width + half * (width // 2)).all()
        assert (left + side <= c * width + (half + 1) * (width // 2)).all()
    # fraction keeps the first crops of each class
    few = sources.make_source(ml_collections.ConfigDict({**section, "fraction": 0.25}), "train")
    assert np.bincount(few.labels).tolist() == [12] * train.num_classes
    assert (few.boxes[:12] == train.boxes[:12]).all()
    with pytest.raises(ConfigError, match="photo_crops has no split 'test'"):
        sources.PhotoCropsSource("test", 16)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    """A tiny array_record TFDS dataset built locally; image pixel value = 40 · label + 10."""
    import tensorflow_datasets as tfds
    data_dir = tmp_path_factory.mktemp("tfds")

    class OnepfracTiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
            })
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7), "test": self._generate_examples(4)}

        def _generate_examples(self, n):
            # PIL images are encoded by PIL; numpy ones would need TensorFlow's PNG encoder.
            for i in range(n):
                image = np.full((5 + i, 9, 3), 40 * (i % 3) + 10, np.uint8)
                yield i, {"image": Image.fromarray(image), "label": i % 3}

    OnepfracTiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_a_prepared_array_record_dataset(tfds_dir):
    fields = {"name": "tfds:onepfrac_tiny", "data_dir": str(tfds_dir), "image_size": 6}
    section = ml_collections.ConfigDict(fields)
    train, test = sources.make_source(section, "train"), sources.make_source(section, "test")
    assert (len(train), len(test)) == (7, 4) and train.class_names == ("zero", "one", "two")
    labels = []
    for i in range(len(train)):
        item = train[i]
        assert item["image"].shape == (6, 6, 3) and item["image"].dtype == np.uint8
        assert (item["image"] == 40 * item["label"] + 10).all()
        labels.append(item["label"])
    assert sorted(labels) == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="validation"):
        sources.make_source(section, "validation")
    section.name = "tfds:onepfrac_missing"
    with pytest.raises(ConfigError, match="tfds build onepfrac_missing"):
        sources.make_source(section, "train")


class _Numbered:
    """In-memory source whose image i is filled with i, so a batch shows which examples it holds."""

    image_size = 2
    num_classes = 5
    class_names = ("a", "b", "c", "d", "e")

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"image": np.full((2, 2, 3), i, np.uint8), "label": i % 5}


def _ids(batch) -> list[int]:
    return np.asarray(batch["image"])[:, 0, 0, 0].tolist()


def _train(seed=0, n=23, global_batch=6, index=0, count=1):
    rows = pipeline.process_rows(global_batch, process_index=index, process_count=count)
    return pipeline.train_dataset(_Numbered(n), seed=seed, global_batch=global_batch, rows=rows)


def test_train_stream_is_a_function_of_seed_and_step_with_epoch_reshuffles():
    ds, again, other = _train(seed=3), _train(seed=3), _train(seed=4)
    assert pipeline.steps_per_epoch(23, 6) == 3
    steps = [_ids(ds[s]) for s in range(9)]
    assert steps == [_ids(again[s]) for s in range(9)]
    assert steps != [_ids(other[s]) for s in range(9)]
    # Seeds are hashed: seed 4 must not replay seed 3's second epoch (grain reseeds epoch e with seed + e).
    assert steps[3:6] != [_ids(other[s]) for s in range(3)]
    epochs = [[i for step in steps[3 * e : 3 * e + 3] for i in step] for e in range(3)]
    for epoch in epochs:  # 18 of the 23 examples, each at most once; the other 5 are dropped this epoch
        assert len(set(epoch)) == 18 and set(epoch) <= set(range(23))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert np.asarray(ds[4]["index"]).tolist() == list(range(24, 30))
    np.testing.assert_array_equal(ds[4]["label"], np.asarray(_ids(ds[4])) % 5)


@pytest.mark.parametrize("count", [2, 3])
def test_one_process_equals_the_union_of_simulated_processes(count):
    whole = _train(seed=1)
    parts = [_train(seed=1, index=p, count=count) for p in range(count)]
    for step in (0, 2, 7):
        for key in ("image", "label", "index"):
            joined = np.concatenate([part[step][key] for part in parts])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_threaded_host_iterator_matches_random_access():
    ds = _train(seed=2)
    stream = pipeline.host_iterator(ds, start=5, num_threads=2, prefetch_batches=3)
    assert [_ids(next(stream)) for _ in range(4)] == [_ids(ds[s]) for s in range(5, 9)]
    stream.close()


def test_worker_processes_give_the_same_stream():
    ds = _train(seed=2)
    stream = pipeline.host_iterator(ds, start=3, num_threads=1, prefetch_batches=2, worker_count=2)
    assert [_ids(next(stream)) for _ in range(5)] == [_ids(ds[s]) for s in range(3, 8)]
    stream.close()


def test_data_worker_count_reaches_the_host_iterator(sharding, monkeypatch):
    from onepfrac_jax.configs.finetune import data_config

    section = data_config("digits", 8, "val")
    seen = []
    host_iterator = pipeline.host_iterator

    def spy(*args, **kwargs):
        seen.append(kwargs["worker_count"])
        return host_iterator(*args, **kwargs)

    monkeypatch.setattr(pipeline, "host_iterator", spy)
    batches = {}
    for workers in (0, 2):
        section.worker_count = workers
        inputs = pipeline.open_host_data(section, seed=0, global_batch=8, sharding=sharding).inputs(4)
        batches[workers] = [next(inputs) for _ in range(2)]
        inputs.close()
    assert seen == [0, 2]
    for ours, theirs in zip(batches[0], batches[2], strict=True):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(ours[key], theirs[key])
    assert np.asarray(batches[2][1]["index"]).tolist() == list(range(40, 48))
    section.worker_count = -1
    with pytest.raises(ConfigError, match=r"data\.worker_count=-1 must be an int >= 0"):
        pipeline.open_host_data(section, seed=0, global_batch=8, sharding=sharding)


@pytest.fixture(scope="module")
def sharding() -> NamedSharding:
    return NamedSharding(jax.make_mesh((4,), ("data",)), P("data"))


def test_train_iterator_yields_sharded_global_batches_and_resumes(sharding):
    source = _Numbered(23)
    it = pipeline.TrainIterator(source, seed=5, global_batch=8, sharding=sharding)
    first = [next(it) for _ in range(7)]
    assert [step for step, _ in first] == list(range(7))
    step, batch = first[0]
    assert batch["image"].shape == (8, 2, 2, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert batch["image"].sharding == sharding and len(batch["image"].addressable_shards) == 4
    assert {shard.data.shape[0] for shard in batch["index"].addressable_shards} == {2}
    expected = _train(seed=5, global_batch=8)
    assert all(_ids(b) == _ids(expected[s]) for s, b in first)

    resumed = pipeline.TrainIterator(source, seed=5, global_batch=8, sharding=sharding, start_step=3)
    for s in range(3, 7):
        step, batch = next(resumed)
        assert step == s and _ids(batch) == _ids(first[s][1])
        np.testing.assert_array_equal(batch["index"], first[s][1]["index"])
    for iterator in (it, resumed):
        iterator.close()
    with pytest.raises(ConfigError, match=rf"data step -1 is outside \[0, {2**31 // 8}\)"):
        pipeline.TrainIterator(source, seed=5, global_batch=8, sharding=sharding, start_step=-1)


def test_eval_covers_every_example_once(sharding):
    source = _Numbered(23)
    batches = list(pipeline.eval_batches(source, global_batch=8, sharding=sharding))
    assert len(batches) == 3 and batches[-1]["mask"].sharding == sharding
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    ids = np.concatenate([_ids(b) for b in batches])
    assert masks.sum() == 23 and sorted(ids[masks].tolist()) == list(range(23))
    assert not masks[23:].any() and (ids[~masks] == 0).all()
    halves = [pipeline.process_rows(8, process_index=p, process_count=2) for p in range(2)]
    parts = [pipeline.eval_dataset(source, global_batch=8, rows=rows) for rows in halves]
    joined = np.concatenate([np.concatenate([part[k]["mask"] for part in parts]) for k in range(3)])
    np.testing.assert_array_equal(joined, masks)


def test_pipeline_rejects_impossible_batches(sharding):
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        pipeline.steps_per_epoch(5, 8)
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        pipeline.process_rows(8, process_index=0, process_count=3)
    with pytest.raises(ConfigError, match="cannot be split over the mesh"):
        pipeline.process_rows(6, sharding=sharding)


def test_digits_through_the_pipeline(sharding):
    source = sources.DigitsSource("val", 8)
    it = pipeline.TrainIterator(source, seed=0, global_batch=16, sharding=sharding)
    _, batch = next(it)
    it.close()
    labels = np.asarray(batch["label"])
    assert batch["image"].shape == (16, 8, 8, 3) and ((labels >= 0) & (labels < 10)).all()
    assert np.asarray(batch["index"]).tolist() == list(range(16))
