"""Image augmentation draws and their color arithmetic, shared by the PIL and DALI loaders.

The reference (fairseq's image_pretraining for data2vec 1.0, BEiT's) is torchvision's
    ColorJitter(b, c, s) -> RandomHorizontalFlip -> RandomResizedCrop(size, bicubic),
and for data2vec 2.0 (MaeImageDataset) RandomResizedCrop(size, scale=(0.2, 1.0), bicubic) -> flip.
draw() makes every random choice of one sample from its numpy generator (the loaders' per-sample
stream): the crop box (torchvision's RandomResizedCrop.get_params), the flip, and ColorJitter's
order and factors (get_params: a random permutation of its four ops, each factor uniform in
[max(0, 1 - strength), 1 + strength]; hue is never on). A jitter strength of 0 draws nothing.

ColorJitter on a PIL image is three ImageEnhance blends, out = trunc(clip(d + f * (x - d))) in
float32 per uint8 channel value, against a degenerate image d:
    brightness  d = 0
    contrast    d = round-half-up of the mean of the image's gray levels, at that point of the order
    saturation  d = the pixel's gray level
where gray = (19595 R + 38470 G + 7471 B + 32768) >> 16 (PIL's RGB -> L). It acts on the whole
image, before the crop, so the contrast mean is the whole image's. jitter_pil() is that
(ImageEnhance itself); jitter_uint8() is the same arithmetic on a torch H x W x 3 uint8 tensor,
equal to it bit for bit; d2v_engine.data.dali_images.dali_jitter is the same arithmetic in DALI ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision's fn_idx order
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
_GRAY = (19595, 38470, 7471)  # PIL's L = (R, G, B) . _GRAY + 0x8000 >> 16


@dataclass
class Augmentation:
    """One sample's draws: crop box (left, top, w, h) in the source image, horizontal flip, and
    the color jitter as (op, factor) pairs in the order they apply."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[str, float], ...] = ()


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: np.random.Generator):
    """(left, top, w, h) of a crop as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_jitter(strengths, rng: np.random.Generator) -> tuple[tuple[str, float], ...]:
    """ColorJitter.get_params from `rng`: ((op, factor), ...) in application order."""
    if not any(strengths):
        return ()
    order = rng.permutation(len(JITTER_OPS))
    factors = {}
    for op, strength in zip(JITTER_OPS, strengths):
        if strength > 0:
            factors[op] = float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
    return tuple((JITTER_OPS[i], factors[JITTER_OPS[i]]) for i in order
                 if JITTER_OPS[i] in factors)


def draw(width: int, height: int, data_cfg, rng: np.random.Generator) -> Augmentation:
    """All of one sample's augmentation draws (data.crop_scale, data.hflip, data.color_jitter)."""
    box = random_resized_crop_box(width, height, data_cfg.crop_scale, CROP_RATIO, rng)
    flip = bool(data_cfg.hflip and rng.random() < 0.5)
    return Augmentation(box, flip, draw_jitter(data_cfg.color_jitter, rng))


def jitter_pil(img: Image.Image, jitter) -> Image.Image:
    """torchvision's ColorJitter on an RGB PIL image with these draws (ImageEnhance)."""
    enhancers = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                 "saturation": ImageEnhance.Color}
    for op, factor in jitter:
        img = enhancers[op](img).enhance(factor)
    return img


def gray_uint8(hwc: torch.Tensor) -> torch.Tensor:
    """H x W x 3 uint8 -> H x W gray levels as int32, PIL's RGB -> L rounding."""
    x = hwc.to(torch.int32)
    return (x[..., 0] * _GRAY[0] + x[..., 1] * _GRAY[1] + x[..., 2] * _GRAY[2] + 0x8000) >> 16


def jitter_uint8(hwc: torch.Tensor, jitter) -> torch.Tensor:
    """jitter_pil's arithmetic on an H x W x 3 uint8 tensor (bit-exact): H x W x 3 uint8."""
    if not jitter:
        return hwc
    x = hwc
    for op, factor in jitter:
        f = torch.tensor(factor, dtype=torch.float32)
        if op == "brightness":
            d = torch.zeros((), dtype=torch.float32)
        elif op == "contrast":
            d = torch.tensor(float(int(gray_uint8(x).double().mean().item() + 0.5)))
        else:
            d = gray_uint8(x).to(torch.float32)[..., None]
        out = d + f * (x.to(torch.float32) - d)
        x = out.clamp_(0.0, 255.0).to(torch.uint8)  # float -> uint8 truncates, as PIL's blend
    return x
