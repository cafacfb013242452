"""host_input: the generated JPEG folder reads as an ImageFolder, and the table has a row per setting."""

import re

import numpy as np
from PIL import Image

from benchmarks import host_input
from onepfrac_jax.data import sources


def test_the_jpeg_folder_is_an_imagefolder_of_photo_sized_jpegs(tmp_path):
    host_input.write_jpeg_folder(tmp_path, 12, 50, 30, num_classes=4)
    source = sources.ImageFolderSource(tmp_path / "train", 16)
    assert len(source) == 12 and source.num_classes == 4
    assert sorted(np.bincount(source.labels).tolist()) == [3, 3, 3, 3]
    with Image.open(source.paths[0]) as image:
        assert image.format == "JPEG" and image.size == (50, 30)
    assert source[0]["image"].shape == (16, 16, 3)


def test_the_benchmark_prints_images_per_second_per_setting(capsys):
    host_input.main(["--images", "24", "--photo", "64x48", "--image-size", "16", "--batch", "8", "--batches", "2",
                     "--workers", "0,1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "24 JPEGs 64×48" in out and "load average" in out
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d+ \|", line)]
    assert [row.split("|")[1:3] for row in rows] == [[" 0 ", " 1 "], [" 1 ", " 1 "]]
    assert all(float(row.split("|")[4]) > 0 for row in rows)
