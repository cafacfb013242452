"""Random-access image sources: each item is decoded to a fixed-size uint8 (H, W, 3) image and an int label.

Four kinds, chosen by `make_source` from the dataset name:
  `imagefolder`  root/<split>/<class>/<image>, as torchvision's ImageFolder (sorted class folders → labels);
  `tfds:<name>`  a TFDS dataset the user prepared in array_record format, read with `tfds.data_source`;
  `digits`       scikit-learn's bundled 8×8 handwritten digits, the built-in demo that needs no download;
  `photo_crops`  square crops of scikit-learn's two bundled photographs, one class per region of a photo: the
                 photos-not-digits set that needs no download (textures and parts of objects).
Resizing is a plain resize to `image_size`² (aspect ratio not kept, so random crops on the device still see
the whole image): bicubic for files, TFDS and photo crops (timm's interpolation), bilinear for the 8×8 digits.
16-bit images keep their high byte; float images are refused.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from onepfrac_jax.config import MAX_IMAGE_SIDE, ConfigError, first_few, require, require_int, require_path

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KNOWN_DATASETS = ("imagefolder", "tfds:<name>", "digits", "photo_crops")
DIGITS_TRAIN_FRACTION = 0.8
PHOTO_GRID = (4, 5)  # photo_crops: regions (classes) per photo, rows × columns
PHOTO_CROPS_PER_CLASS = {"train": 48, "val": 12}
_PHOTO_STREAM = {"train": 0, "val": 1}  # photo_crops' generator keys: the splits draw apart
PHOTOS = ("china", "flower")  # photo_crops' photographs: scikit-learn's sklearn/datasets/images/<name>.jpg
_VERIFY_CHUNK = 64  # files per verification task: few tasks for a million files, still even across threads

# PIL's errors for unreadable files: UnidentifiedImageError and truncation are OSErrors, some plugins raise
# SyntaxError/ValueError on bad headers, and DecompressionBombError stands alone.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _sklearn_file(*parts: str) -> Path:
    """A data file that scikit-learn ships under sklearn/datasets/, found without importing scikit-learn (its import
    costs a second: every digits run paid it)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the digits and photo_crops sources read files that scikit-learn ships: "
                          "pip install scikit-learn (requirements.txt)")
    return Path(spec.submodule_search_locations[0], "datasets", *parts)


class Source(Protocol):
    """What the pipeline needs from a source."""

    image_size: int
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def per_class_subset(labels: Sequence[int], fraction: float) -> np.ndarray:
    """Positions of the first ceil(fraction · n_c) items of every class c, in their original order."""
    require(0.0 < fraction <= 1.0, f"fraction={fraction} must be in (0, 1]")
    labels = np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        positions = np.flatnonzero(labels == label)
        keep[positions[: math.ceil(fraction * len(positions))]] = True
    return np.flatnonzero(keep)


def _require_split(split: str, known: tuple[str, ...], dataset: str) -> None:
    require(split in known, f"{dataset} has no split {split!r}; its splits are {', '.join(known)}")


def _eight_bit(values: np.ndarray) -> np.ndarray:
    """uint8 pixels from 8-bit or 16-bit ones (0..65535, of which the high byte is kept)."""
    if values.dtype == np.uint8:
        return values
    # Pillow opens 16-bit PNG/TIFF as 'I;16'/'I;16B', and 16-bit PGM (any maxval, rescaled to 0..65535) as 'I'.
    in_range = np.issubdtype(values.dtype, np.integer) and values.min() >= 0 and values.max() <= 65535
    require(in_range, f"{values.dtype} pixels in {values.min()}..{values.max()} are not supported "
                      "(only 8-bit and 16-bit images are)")
    return (values >> 8).astype(np.uint8)


def _rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert clips 16-bit and float values at 255 instead of scaling them.
    if image.mode == "F" or image.mode.startswith("I"):
        image = Image.fromarray(_eight_bit(np.asarray(image)))
    return image.convert("RGB")


def _square_array(image: Image.Image, size: int) -> np.ndarray:
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _open_rgb(path: str | os.PathLike, size: int) -> Image.Image:
    """Decodes an image file to RGB at about `size` or more; ConfigError naming the file if it cannot be read."""
    try:
        with Image.open(path) as image:
            # JPEG decoders can scale by 1/2, 1/4, 1/8 while decoding: much faster for large photos, and draft
            # never goes below the requested size, so the final bicubic resize still does the filtering.
            image.draft("RGB", (size, size))
            return _rgb(image)
    except _DECODE_ERRORS as e:
        raise ConfigError(f"cannot decode image {path}: {e}") from e


def decode_image_file(path: str | os.PathLike, size: int) -> np.ndarray:
    """Reads an image file as (size, size, 3) uint8; a file PIL cannot decode raises ConfigError naming it."""
    return _square_array(_open_rgb(path, size), size)


def class_folders(root: Path) -> list[str]:
    """Sorted class folder names under `root`, as torchvision's find_classes (every subdirectory)."""
    require(root.is_dir(), f"ImageFolder directory {root} does not exist")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    require(bool(names), f"ImageFolder directory {root} has no class folders (expected {root}/CLASS/IMAGE)")
    return names


def _deepest_link(path: Path, root: Path) -> Path | None:
    """The deepest symlink among `path` and its parents below `root`."""
    parts = [path, *path.parents]
    return next((part for part in parts[: parts.index(root)] if part.is_symlink()), None)


def _read_twice_error(again: Path, again_class: str, first: Path, first_class: str, root: Path) -> ConfigError:
    """The error for a directory reached a second time: names the symlink that leads there."""
    # Two paths below `root` with one real path: at least one of them goes through a symlink.
    link = _deepest_link(again, root) or _deepest_link(first, root)
    target = Path(os.path.realpath(link))
    if Path(os.path.realpath(link.parent)).is_relative_to(target):
        return ConfigError(f"ImageFolder symlink {link} -> {target} is a loop: it points to a folder that holds it")
    return ConfigError(f"ImageFolder symlink {link} -> {target} makes one folder read twice: as {first} "
                       f"(class {first_class!r}) and as {again} (class {again_class!r})")


def _image_files(folder: Path, class_name: str, root: Path, seen: dict[str, tuple[Path, str]]) -> list[Path]:
    """Images under `folder` in torchvision's make_dataset order: os.walk following links, sorted paths."""
    # `seen` maps the real path of every directory read so far in the split to (its path, its class): a link
    # back to an ancestor would otherwise be walked until the path grows too long, and a link to another
    # class's folder would label its images twice.
    walked = []
    for dirpath, dirnames, _ in os.walk(folder, followlinks=True):
        dirnames.sort()  # a deterministic walk, so the error always blames the same link
        real = os.path.realpath(dirpath)
        if real in seen:
            raise _read_twice_error(Path(dirpath), class_name, *seen[real], root)
        seen[real] = (Path(dirpath), class_name)
        walked.append(dirpath)
    return [path for dirpath in sorted(walked) for path in _image_entries(dirpath)]


def _image_entries(dirpath: str) -> list[Path]:
    """The image files of one directory, sorted; one whose name says image but is no regular file (nor a symlink to
    one) is a ConfigError naming it: reading a FIFO waits forever for a writer, a device or socket holds no image.
    DirEntry.is_file reads the type listed with the name: no system call per regular file."""
    with os.scandir(dirpath) as entries:
        found = [e for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and not e.is_dir()]
    for entry in found:
        if not entry.is_file():
            try:
                mode = os.stat(entry.path).st_mode
            except OSError as e:
                raise ConfigError(f"ImageFolder file {entry.path} cannot be read ({e.strerror}; a broken symlink?): "
                                  f"fix or remove it") from e
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise ConfigError(f"ImageFolder file {entry.path} is {kind}, not a regular file: remove it or move it "
                              f"out of the tree")
    return sorted(Path(e.path) for e in found)


class ImageFolderSource:
    """`root/<class>/<image>` files, labels = index of the class folder among the sorted class names."""

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        fraction: float = 1.0,
        class_names: Sequence[str] | None = None,
    ):
        """`class_names` pins the labels (e.g. to the train split's) for a split that may lack classes."""
        require(image_size > 0, f"image_size={image_size} must be positive")
        self.root = Path(root)
        self.image_size = image_size
        found = class_folders(self.root)
        if class_names is None:
            class_names = found
        unknown = sorted(set(found) - set(class_names))
        require(not unknown, f"{self.root} has class folders not among the training classes: {unknown[:10]}")
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        paths, labels, seen = [], [], {}
        for name in found:
            files = _image_files(self.root / name, name, self.root, seen)
            require(bool(files), f"class folder {self.root / name} has no images {IMG_EXTENSIONS}")
            paths.extend(files)
            labels.extend([self.class_names.index(name)] * len(files))
        keep = per_class_subset(labels, fraction)
        self.paths = [paths[i] for i in keep]
        self.labels = np.asarray(labels, dtype=np.int32)[keep]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = decode_image_file(self.paths[index], self.image_size)
        return {"image": image, "label": int(self.labels[index])}

    def verify(self, num_threads: int, log_every_s: float = 10.0) -> None:
        """Decodes every file as training does; raises one ConfigError naming the files that fail."""
        # Only the final resize is skipped: it is most of the time for photos and cannot fail on RGB pixels.
        chunks = [self.paths[i : i + _VERIFY_CHUNK] for i in range(0, len(self.paths), _VERIFY_CHUNK)]
        threads = max(1, num_threads)  # 0, grain's "decode in the calling thread", is one thread here too
        bad, done = [], 0
        start = last_log = time.monotonic()
        # Threads suffice: Pillow releases the GIL while decoding.
        pool = ThreadPoolExecutor(threads, thread_name_prefix="verify")
        try:
            for chunk, errors in zip(chunks, pool.map(self._decode_errors, chunks), strict=True):
                bad.extend(errors)
                done += len(chunk)
                now = time.monotonic()
                if now - last_log >= log_every_s:
                    rate = done / max(now - start, 1e-9)
                    logging.info("verifying %s: %d/%d images, %.0f files/s, %.0f s left", self.root, done,
                                 len(self.paths), rate, (len(self.paths) - done) / rate)
                    last_log = now
        finally:
            pool.shutdown(cancel_futures=True)  # an interrupt must not wait for the rest of the tree
        seconds = time.monotonic() - start
        logging.info("verified %d images under %s in %.1f s (%.0f files/s, %d threads)", len(self.paths),
                     self.root, seconds, len(self.paths) / max(seconds, 1e-9), threads)
        if bad:
            raise ConfigError(f"{len(bad)} of {len(self.paths)} images under {self.root} cannot be decoded: "
                              f"{first_few(bad, '; ')}")

    def _decode_errors(self, paths: Sequence[Path]) -> list[str]:
        errors = []
        for path in paths:
            try:
                _open_rgb(path, self.image_size)
            except ConfigError as e:
                errors.append(str(e))
        return errors


def verify_source(source: Source, max_files: int, num_threads: int) -> None:
    """Start-up check: decodes every image of an ImageFolder split of at most `max_files` images (0: never)."""
    # Only ImageFolder reads files users assembled: digits is built in, and TFDS wrote its examples itself.
    # A tree too large to check up front still fails on the first unreadable image, naming it.
    require(max_files >= 0, f"data.verify_max_files={max_files} must be >= 0 (0 turns the start-up check off)")
    if not isinstance(source, ImageFolderSource):
        return
    if len(source) > max_files:
        logging.info("not checking the %d images under %s before the run (data.verify_max_files=%d): an "
                     "unreadable image stops the run when it is read", len(source), source.root, max_files)
        return
    source.verify(num_threads)


class DigitsSource:
    """scikit-learn's handwritten digits: 0..16 scaled to 0..255, bilinear upsampling, 3 equal channels.

    Split: the first 80% in scikit-learn's order is `train`, the rest `val` (the two parts come mostly from
    different writers, as in scikit-learn's own digits example).
    """

    def __init__(self, split: str, image_size: int, fraction: float = 1.0):
        _require_split(split, ("train", "val"), "digits")
        require(image_size > 0, f"image_size={image_size} must be positive")
        with gzip.open(_sklearn_file("data", "digits.csv.gz"), "rt") as f:
            table = np.loadtxt(f, delimiter=",")  # 1,797 rows: 64 pixels of 0..16, then the digit
        images = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
        cut = int(DIGITS_TRAIN_FRACTION * len(images))
        part = slice(None, cut) if split == "train" else slice(cut, None)
        images, labels = images[part], table[part, -1].astype(np.int32)
        keep = per_class_subset(labels, fraction)
        self.images, self.labels = images[keep], labels[keep]
        self.image_size = image_size
        self.class_names = tuple(str(digit) for digit in range(10))
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.image_size
        small = Image.fromarray(self.images[index])
        image = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        return {"image": np.repeat(image[:, :, None], 3, axis=2), "label": int(self.labels[index])}


class PhotoCropsSource:
    """Square crops of scikit-learn's two bundled photographs (china.jpg, flower.jpg; 427 × 640 each).

    Each photo is cut into `PHOTO_GRID` (4 × 5) regions of about 106 × 128 px and each region is a class: 40
    classes, named `photo-row-column`. A region's left half gives its `train` crops, its right half its `val` crops,
    so no val pixel is ever seen in training. A crop is a square of 40–64 px (the half's width) at a place in the
    half, both drawn from a generator keyed by (split, class, index): the set is the same on every machine. 48 train
    and 12 val crops a class (1,920 and 480), resized bicubically to `image_size` once, at construction. `boxes`
    says where each came from: (photo, top, left, side) in the photo's pixels.
    """

    def __init__(self, split: str, image_size: int, fraction: float = 1.0):
        _require_split(split, ("train", "val"), "photo_crops")
        require(image_size > 0, f"image_size={image_size} must be positive")
        rows, cols = PHOTO_GRID
        per_class = PHOTO_CROPS_PER_CLASS[split]
        images, labels, names, boxes = [], [], [], []
        for index, stem in enumerate(PHOTOS):
            with Image.open(_sklearn_file("images", f"{stem}.jpg")) as jpeg:
                photo = np.asarray(jpeg)
            height, width = photo.shape[0] // rows, photo.shape[1] // cols
            half = width // 2
            for r in range(rows):
                for c in range(cols):
                    label = len(names)
                    names.append(f"{stem}-{r}-{c}")
                    left = c * width + (half if split == "val" else 0)
                    rng = np.random.default_rng([_PHOTO_STREAM[split], label])
                    for _ in range(per_class):
                        side = int(rng.integers(min(40, half), half + 1))
                        y = r * height + int(rng.integers(0, height - side + 1))
                        x = left + int(rng.integers(0, half - side + 1))
                        crop = Image.fromarray(photo[y : y + side, x : x + side])
                        images.append(_square_array(crop, image_size))
                        labels.append(label)
                        boxes.append((index, y, x, side))
        labels = np.asarray(labels, dtype=np.int32)
        keep = per_class_subset(labels, fraction)
        self.images, self.labels, self.boxes = np.stack(images)[keep], labels[keep], np.asarray(boxes)[keep]
        self.image_size = image_size
        self.class_names = tuple(names)
        self.num_classes = len(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}


class TfdsSource:
    """A prepared TFDS dataset in array_record format, read by `tfds.data_source` (no TensorFlow needed)."""

    def __init__(self, name: str, split: str, image_size: int, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # here, not at the top: importing it takes seconds

        require(image_size > 0, f"image_size={image_size} must be positive")
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many unrelated types here; the message is what users need
            raise ConfigError(
                f"cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: {e} — prepare "
                f"it once with `tfds build {name} --file_format=array_record --data_dir=DIR`"
            ) from e
        features = self._data.dataset_info.features
        missing = {"image", "label"} - set(features.keys())
        require(not missing, f"TFDS dataset {name!r} has no {sorted(missing)} feature(s)")
        names = getattr(features["label"], "names", None)
        require(names is not None, f"TFDS dataset {name!r}: feature 'label' is not a ClassLabel")
        self.image_size = image_size
        self.class_names = tuple(names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self._data[index]
        image = _eight_bit(example["image"])  # TFDS Image features may be uint16
        if image.ndim == 2 or image.shape[-1] == 1:
            image = Image.fromarray(image.reshape(image.shape[:2]))
        else:
            image = Image.fromarray(image[:, :, :3])
        return {"image": _square_array(_rgb(image), self.image_size), "label": int(example["label"])}


def validate_section(section: ml_collections.ConfigDict) -> None:
    """A data section's fields that need no file read: its directory's length and the decode size."""
    require_path("data.data_dir", section.get("data_dir", ""))
    require_int("data.image_size", section.image_size, 1, MAX_IMAGE_SIDE, " (an image's pixels are indexed in int32)")


def make_source(section: ml_collections.ConfigDict, split: str) -> Source:
    """The source for `section.name` and `split`.

    Keys read: name, image_size, data_dir (imagefolder, tfds), fraction (default 1.0; applied to the `train`
    split only, as a per-class subset of the first ceil(fraction · n) items in sorted file / dataset order).
    """
    name = section.name
    fraction = section.get("fraction", 1.0) if split == "train" else 1.0
    if name == "imagefolder":
        data_dir = Path(section.data_dir)
        train_dir = data_dir / "train"
        # Every split labels its folders by the train split's classes, so a val tree missing a class
        # (or listing them in another order) cannot silently shift the labels.
        names = class_folders(train_dir) if split != "train" and train_dir.is_dir() else None
        return ImageFolderSource(data_dir / split, section.image_size, fraction, names)
    if name == "digits":
        return DigitsSource(split, section.image_size, fraction)
    if name == "photo_crops":
        return PhotoCropsSource(split, section.image_size, fraction)
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        require(fraction == 1.0,
                f"fraction={fraction} is supported for imagefolder, digits and photo_crops, not {name}")
        return TfdsSource(name[len("tfds:") :], split, section.image_size, section.get("data_dir") or None)
    raise ConfigError(f"unknown dataset name {name!r}; known: {', '.join(KNOWN_DATASETS)}")
