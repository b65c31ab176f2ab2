#!/usr/bin/env python3
"""Reference fixtures for reading image folders as pytorch-fid does (`fid-metrics`, `data.rs`).

Writes into tests/fixtures/fid/images/:

* selection.json
    A folder layout (file, folder and symlink names, all lower case) and the files pytorch-fid
    0.3.0's `compute_statistics_of_path` takes from it: `sorted(path.glob('*.<ext>'))` over its
    `IMAGE_EXTENSIONS`. The selection is captured by replacing `calculate_activation_statistics`
    (which would run the Inception network on the files) with a function that records its list;
    the files are empty, since only their names matter to the selection.
* *.png, *.tif and conversions.json
    Small images in the modes PIL reads differently from plain 8-bit RGB (16-bit grey, 16-bit RGB,
    RGBA and grey+alpha, palettes with and without transparency, 1-bit, 8-bit RGBA and grey+alpha)
    and, for each, PIL's `Image.open(path).convert('RGB')` (pytorch-fid's `ImagePathDataset`, its
    only conversion): mode, size and the H x W x 3 bytes. 16-bit PNGs that PIL cannot write are
    written by the small PNG encoder below (zlib + CRC, filter type 0); PIL only reads them.

Run with the project's venv python from the repository root:
    ~/.cache/ddss-rs/torch-2.11.0/bin/python tests/scripts/gen_image_fixtures.py
"""

import json
import os
import pathlib
import struct
import tempfile
import zlib

import numpy as np
import PIL
from PIL import Image
import pytorch_fid
from pytorch_fid import fid_score

OUT = pathlib.Path("tests/fixtures/fid/images")

# Every name is lower case: pytorch-fid's glob is case-sensitive on Linux, ours is not.
FILES = [
    "a.png", "b.jpg", "c.jpeg", "d.pgm", "e.ppm", "f.bmp", "g.tif", "h.tiff", "i.webp",
    "10.png", "9.png", "a-b.png", "a_b.png", "a.b.png", "sub/x.png",
    "z.gif", "m.pbm", "readme.txt", "thumbs.db", "labels.csv", "notes", "png", "archive.png.zip",
    "image.png.bak", ".ds_store",
]
FOLDERS = ["sub", "empty"]
SYMLINKS = {"linked": "sub", "alias.png": "a.png"}


def selection():
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for folder in FOLDERS:
            (root / folder).mkdir()
        for name in FILES:
            (root / name).write_bytes(b"")
        for name, target in SYMLINKS.items():
            os.symlink(target, root / name)
        captured = []

        def record(files, *args, **kwargs):
            captured.extend(files)
            return np.zeros(1), np.zeros((1, 1))

        original = fid_score.calculate_activation_statistics
        fid_score.calculate_activation_statistics = record
        try:
            fid_score.compute_statistics_of_path(str(root), None, 50, 2048, "cpu")
        finally:
            fid_score.calculate_activation_statistics = original
        selected = [str(pathlib.Path(p).relative_to(root)) for p in captured]
    return {
        "pytorch_fid_version": pytorch_fid.__version__,
        "image_extensions": sorted(fid_score.IMAGE_EXTENSIONS),
        "files": FILES,
        "folders": FOLDERS,
        "symlinks": SYMLINKS,
        "selected": selected,
    }


def png_bytes(width, height, bit_depth, color_type, rows):
    """A PNG with unfiltered rows (bytes each), for the modes PIL cannot write."""

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_png16(path, values, color_type):
    values = np.ascontiguousarray(values.astype(">u2"))
    height, width = values.shape[:2]
    path.write_bytes(png_bytes(width, height, 16, color_type, [row.tobytes() for row in values]))


def conversion_images():
    """Writes the conversion images; returns their names."""
    rng = np.random.default_rng(24)
    grey16 = np.array([[0, 100, 255, 256], [1000, 40000, 65535, 300], [7, 254, 512, 65280]], dtype=np.uint16)
    Image.fromarray(grey16).save(OUT / "grey16.png")  # mode I;16
    Image.fromarray(grey16).save(OUT / "grey16.tif")
    rgb16 = np.stack([grey16, grey16[::-1], 65535 - grey16], -1)
    write_png16(OUT / "rgb16.png", rgb16, 2)
    write_png16(OUT / "rgba16.png", np.concatenate([rgb16, np.full((3, 4, 1), 1234)], -1), 6)
    write_png16(OUT / "la16.png", np.stack([grey16, 65535 - grey16], -1), 4)
    rgba = rng.integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a fully transparent pixel keeps its colour
    Image.fromarray(rgba).save(OUT / "rgba.png")  # mode RGBA
    la = rng.integers(0, 256, size=(3, 4, 2), dtype=np.uint8)
    Image.fromarray(la).save(OUT / "la.png")  # mode LA
    palette = Image.frombytes("P", (4, 3), rng.integers(0, 4, size=(3, 4), dtype=np.uint8).tobytes())
    palette.putpalette([200, 10, 30, 0, 255, 0, 12, 34, 56, 255, 255, 255])
    palette.save(OUT / "palette.png")
    palette.save(OUT / "palette_trns.png", transparency=1)
    bilevel = Image.fromarray(rng.integers(0, 2, size=(3, 4), dtype=np.uint8) * 255).convert("1")
    bilevel.save(OUT / "bilevel.png")
    return ["grey16.png", "grey16.tif", "rgb16.png", "rgba16.png", "la16.png", "rgba.png", "la.png",
            "palette.png", "palette_trns.png", "bilevel.png"]


def conversions(names):
    out = {}
    for name in names:
        with Image.open(OUT / name) as image:
            rgb = np.asarray(image.convert("RGB"))
            out[name] = {
                "mode": image.mode,
                "width": image.width,
                "height": image.height,
                "rgb": rgb.reshape(-1).tolist(),
            }
    return {"pillow_version": PIL.__version__, "images": out}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "selection.json").write_text(json.dumps(selection(), indent=1) + "\n")
    names = conversion_images()
    (OUT / "conversions.json").write_text(json.dumps(conversions(names)) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
