"""Image folder dataset (CPU, PIL): class sub-folders give labels; a flat folder is unlabelled.

Augmentation is the reference's (d2v_engine.data.augment): torchvision's ColorJitter on the whole image
(data.color_jitter, BEiT / data2vec 1.0), its RandomResizedCrop (same sampling, including the
fall-back to a center crop after 10 failed draws) resized with data.interpolation (PIL's
antialiased BICUBIC by default) and a horizontal flip, drawn only from the `rng` passed to load();
evaluation resizes the short side and center-crops with the same filter.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from d2v_engine.config import DataConfig
from d2v_engine.data.augment import (  # noqa: F401  (random_resized_crop_box: the crop's home was here)
    PIL_FILTERS, draw, jitter_pil, random_resized_crop_box,
)
from d2v_engine.data.common import bad_file, check_file, with_labels
from d2v_engine.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images_in(folder: str, recursive: bool) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return found


def scan_image_folder(root: Path) -> tuple[list[str], list[int] | None, list[str]]:
    """(files, labels or None, class names): sub-folders with images are classes, sorted by name."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    flat = _images_in(str(root), recursive=False)
    classes, files, labels = [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            inside = _images_in(entry.path, recursive=True)
            if inside:
                labels += [len(classes)] * len(inside)
                classes.append(entry.name)
                files += inside
    if flat and classes:
        raise DataError(f"{root} mixes images and class folders; use one or the other")
    if flat:
        return flat, None, []
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return files, labels, classes


def read_image_list(path: Path) -> tuple[list[str], list[int] | None, list[str]]:
    """(files, labels or None, class names) of a list written by `d2v-prepare image`: the
    root folder on line 1, then `relative_path[<TAB>label]` (labels on every line or none);
    class names from classes.txt beside it when present."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty; line 1 must be the root folder of the images")
    root = Path(lines[0].strip())
    root = root if root.is_absolute() else Path(path).parent / root
    rows = [line.split("\t") for line in lines[1:]]
    if not rows:
        raise DataError(f"{path} lists no images (only the root line)")
    labelled = len(rows[0]) > 1
    files, labels = [], []
    for number, parts in enumerate(rows, start=2):
        if (len(parts) > 1) != labelled or (labelled and not parts[1].strip().isdigit()):
            raise DataError(f"{path} line {number}: expected 'path<TAB>label' on every line or "
                            f"'path' on every line, got {chr(9).join(parts)!r}")
        files.append(str(root / parts[0]))
        if labelled:
            labels.append(int(parts[1]))
    classes_file = Path(path).parent / "classes.txt"
    classes = []
    if labelled:
        count = max(labels) + 1
        names = classes_file.read_text().split("\n") if classes_file.is_file() else []
        names = [n for n in names if n]
        classes = names if len(names) == count else [str(i) for i in range(count)]
    return files, (labels if labelled else None), classes


def center_crop_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the short side to `size` (torchvision
    Resize(int)), then the central size x size square of that."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def resize_center_crop(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Short side to `size` (torchvision Resize(int)), then the central size x size square."""
    new_w, new_h, left, top = center_crop_geometry(*img.size, size)
    img = img.resize((new_w, new_h), PIL_FILTERS[interpolation])
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> 3 x H x W float32, ImageNet mean/std normalized."""
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels.float().div_(255.0) - mean).div_(std).contiguous()


class ImageFolderDataset:
    """Images under one folder; load() -> {"source": 3 x S x S float32 (+ "label" int)}."""

    def __init__(self, data_cfg: DataConfig, root: Path):
        self.cfg = data_cfg
        self.root = Path(root)
        # A folder is scanned; a file is the list `d2v-prepare image` wrote.
        scan = read_image_list if self.root.is_file() else scan_image_folder
        self.files, self.labels, self.classes = scan(self.root)
        self.num_labels = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, path: str) -> Image.Image:
        """The file as an RGB PIL image; BadSample or DataError (data.on_bad_file) if it fails."""
        try:
            check_file(path, self.cfg.max_file_bytes)
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise bad_file(self.cfg.on_bad_file, path, str(e).splitlines()[0]) from None

    def transform(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """Color jitter, random resized crop + flip from `rng` when data.augment, else resize +
        center crop."""
        size, filt = self.cfg.img_size, PIL_FILTERS[self.cfg.interpolation]
        if not self.cfg.augment:
            return to_normalized_tensor(resize_center_crop(img, size, self.cfg.interpolation))
        aug = draw(*img.size, self.cfg, rng)
        img = jitter_pil(img, aug.jitter)  # the whole image: the contrast mean is the image's
        left, top, w, h = aug.box
        img = img.crop((left, top, left + w, top + h)).resize((size, size), filt)
        if aug.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)

    def load(self, index: int, rng: np.random.Generator) -> dict:
        """Sample `index`: "source" 3 x img_size x img_size float32 (+ "label" int)."""
        sample = {"source": self.transform(self.decode(self.files[index]), rng)}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        return sample

    def collate(self, samples: list[dict], rng: np.random.Generator | None = None) -> dict:
        """Stacks samples: "source" B x 3 x S x S float32, "padding_mask" None, "label" B int64."""
        batch = {"source": torch.stack([s["source"] for s in samples]), "padding_mask": None}
        return with_labels(batch, samples)

    def describe(self) -> str:
        """One line: folder, image count, classes, transform."""
        kind = f"{self.num_labels} classes" if self.num_labels else "unlabelled"
        jitter = (f"color jitter {self.cfg.color_jitter} + " if any(self.cfg.color_jitter)
                  else "")
        aug = (f"{jitter}random resized crop {self.cfg.crop_scale} {self.cfg.interpolation}"
               + (" + hflip" if self.cfg.hflip else "")
               if self.cfg.augment else f"center crop {self.cfg.interpolation}")
        return (f"images {self.root}: {len(self)} files, {kind}, {self.cfg.img_size}px, {aug}")
