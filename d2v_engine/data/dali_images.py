"""DALI image loader: the ImageFolderDataset's files decoded, jittered, cropped, flipped and
normalized by DALI.

Same files and labels as images.ImageFolderDataset (class sub-folders, or a flat unlabelled folder)
and the same random draws: d2v_engine.data.augment.draw() makes the crop box, the flip and the color
jitter from the sample's numpy generator exactly as the PIL path does (the box needs only the image
size, read from the file header), so DALI and PIL crop the same region with the same colors.

On the GPU (device="mixed": nvJPEG) everything stays in the DALI graph (dali_graph). Without color
jitter DALI decodes only the crop region (fn.decoders.image_slice) and resizes it to img_size with
data.interpolation (antialiased); with it, it decodes the whole image, jitters it with dali_jitter
(PIL's ImageEnhance arithmetic in DALI's arithmetic and reduction ops: torchvision's contrast
blends towards the whole image's mean gray level, which fn.contrast can only take as a host-side
argument) and resizes the crop's ROI. fn.crop_mirror_normalize then flips and normalizes with the
ImageNet mean/std: B x 3 x S x S float32 on the loader's device (cast to `dtype` there). Without
data.augment: short side to img_size, then the central square, as the PIL path.

On the CPU (device_id=None) DALI decodes (the crop region, or the whole image under jitter) on
its threads, and torch does the arithmetic: d2v_engine.data.augment.jitter_uint8 (bit-exact with
PIL's), the crop and flip, and the resize in torch's uint8 antialiased kernel (PIL's filter):
DALI's CPU resampler measured 4-5 ms per 500x375 -> 224 image on one core here, torch's 0.2 ms,
so DALI's resize alone made the CPU loader slower than the PIL fallback. The normalization then
runs once over the batch.

Bad files found before DALI sees them: missing, empty, not an image PIL can identify, a JPEG
without its end-of-image marker (truncated). Anything else the decoder rejects is found by
dali_common's recovery.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from d2v_engine.data.augment import draw, jitter_uint8
from d2v_engine.data.common import bad_file, check_file
from d2v_engine.data.dali_common import DaliLoader, one_torch_thread
from d2v_engine.data.images import (
    IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, center_crop_geometry,
)

JITTER_SLOTS = 3  # brightness, contrast, saturation in a per-sample order


def jitter_slots(jitter) -> np.ndarray:
    """(op, factor) pairs -> JITTER_SLOTS x 3 float32 rows (factor, contrast weight, saturation
    weight): slot k blends towards contrast * mean gray + saturation * gray (brightness: 0) with
    that factor; an unused slot is the identity (factor 1)."""
    slots = np.zeros((JITTER_SLOTS, 3), dtype=np.float32)
    slots[:, 0] = 1.0
    for k, (op, factor) in enumerate(jitter):
        slots[k] = (factor, op == "contrast", op == "saturation")
    return slots


def slot_ops(slots: np.ndarray) -> tuple[tuple[str, float], ...]:
    """Inverse of jitter_slots (identity slots dropped); factors as the float32 the graph uses."""
    ops = []
    for factor, contrast, saturation in np.asarray(slots, dtype=np.float32):
        if factor != 1.0:
            op = "contrast" if contrast else "saturation" if saturation else "brightness"
            ops.append((op, float(factor)))
    return tuple(ops)


def dali_jitter(img, slots):
    """ColorJitter in DALI ops (on img's device): H x W x 3 uint8 node, JITTER_SLOTS x 3 slots
    (jitter_slots) -> H x W x 3 uint8; the arithmetic of d2v_engine.data.augment, float32 as PIL's."""
    import nvidia.dali as dali
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    x = fn.cast(img, dtype=types.FLOAT)
    for k in range(JITTER_SLOTS):
        factor, contrast, saturation = slots[k, 0], slots[k, 1], slots[k, 2]
        if img.device == "gpu":
            factor, contrast, saturation = factor.gpu(), contrast.gpu(), saturation.gpu()
        # PIL's RGB -> L, exact in float32 (the sum stays under 2^24)
        gray = dmath.floor((x[:, :, 0] * 19595.0 + x[:, :, 1] * 38470.0 + x[:, :, 2] * 7471.0
                            + 32768.0) / 65536.0)
        mean = dmath.floor(fn.reductions.mean(gray) + 0.5)
        degenerate = contrast * mean + saturation * gray[:, :, dali.newaxis]
        x = dmath.floor(dmath.clamp(degenerate + factor * (x - degenerate), 0.0, 255.0))
    return fn.cast(x, dtype=types.UINT8)

_JPEG_TAIL = 4096  # bytes searched for the end-of-image marker (some cameras pad after it)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header; ValueError for an empty, unknown or truncated file."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            size, kind = img.size, img.format
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    if kind == "JPEG" and b"\xff\xd9" not in data[-_JPEG_TAIL:]:
        raise ValueError("JPEG truncated (no end-of-image marker)")
    return size


class DaliImageLoader(DaliLoader):
    """Micro-batches {"source": B x 3 x S x S, "padding_mask": None, "label"?: B int64, ...}."""

    # encoded bytes, crop anchor (x, y), crop shape (w, h), mirror flag, crop ROI start (y, x),
    # ROI end (y, x), jitter slots
    num_inputs = 7

    def __init__(self, dataset: ImageFolderDataset, *args, dtype: torch.dtype = torch.float32,
                 **kwargs):
        super().__init__(dataset, *args, **kwargs)
        from nvidia.dali import types

        self.input_dtypes = (types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT,
                             types.FLOAT, types.FLOAT)
        self.dtype = dtype
        self.cfg = dataset.cfg
        self.jitter = self.cfg.augment and any(self.cfg.color_jitter)

    def path_of(self, index: int) -> str:
        return self.dataset.files[index]

    def prepare_sample(self, index: int, rng: np.random.Generator):
        path = self.dataset.files[index]
        try:
            check_file(path, self.cfg.max_file_bytes)
            with open(path, "rb") as f:
                data = f.read(self.cfg.max_file_bytes + 1)
            width, height = image_size(data)
        except FileNotFoundError:
            raise bad_file(self.cfg.on_bad_file, path, "file not found") from None
        except (OSError, ValueError) as e:
            raise bad_file(self.cfg.on_bad_file, path, str(e)) from None
        if self.cfg.augment:
            aug = draw(width, height, self.cfg, rng)
            (left, top, w, h), mirror, jitter = aug.box, int(aug.flip), aug.jitter
        else:  # the PIL path's draws are none; the graph resizes and center-crops
            left, top, w, h, mirror, jitter = 0, 0, width, height, 0, ()
        arrays = [np.frombuffer(data, dtype=np.uint8),
                  np.array([left, top], dtype=np.float32), np.array([w, h], dtype=np.float32),
                  np.array(mirror, dtype=np.int32),
                  np.array([top, left], dtype=np.float32),
                  np.array([top + h, left + w], dtype=np.float32), jitter_slots(jitter)]
        label = self.dataset.labels[index] if self.dataset.labels is not None else None
        return arrays, {"label": label}

    def plan_batch(self, prepared, facts) -> None:
        if self.dataset.labels is not None:
            prepared.extra["label"] = [f["label"] for f in facts]

    def graph(self, inputs, gpu: bool):
        from nvidia.dali import fn, types

        if gpu:
            return self.dali_graph(inputs, "mixed")
        # CPU: decode (and flip) only; finish() does the arithmetic (see the module docstring)
        encoded, anchor, shape, mirror = inputs[:4]
        if not self.cfg.augment or self.jitter:  # jitter needs the whole image's mean gray
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        img = fn.decoders.image_slice(encoded, anchor, shape, device="cpu",
                                      output_type=types.RGB, axis_names="WH",
                                      normalized_anchor=False, normalized_shape=False)
        # Flipping before the resize gives PIL's resize-then-flip: the filter is symmetric.
        return fn.flip(img, horizontal=mirror)

    def dali_graph(self, inputs, decoder: str):
        """The whole augmentation in DALI ops (decoder "mixed": on the GPU) -> B x 3 x S x S."""
        from nvidia.dali import fn, types

        encoded, anchor, shape, mirror, roi_start, roi_end, slots = inputs
        size = self.cfg.img_size
        interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[
            self.cfg.interpolation]
        if self.jitter:
            img = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            img = fn.resize(dali_jitter(img, slots), size=[size, size], roi_start=roi_start,
                            roi_end=roi_end, roi_relative=False, interp_type=interp,
                            antialias=True)
        elif self.cfg.augment:
            img = fn.decoders.image_slice(encoded, anchor, shape, device=decoder,
                                          output_type=types.RGB, axis_names="WH",
                                          normalized_anchor=False, normalized_shape=False)
            img = fn.resize(img, size=[size, size], interp_type=interp, antialias=True)
        else:
            img = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=size, interp_type=interp, antialias=True)
        return fn.crop_mirror_normalize(
            img, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5,
            mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])

    def finish(self, prepared, outputs) -> dict:
        if self.gpu:
            source = self.to_torch(outputs[0], self.dtype)
        else:
            source = self.resize_on_cpu(outputs[0], prepared)
        batch = {"source": source, "padding_mask": None}
        if "label" in prepared.extra:
            batch["label"] = torch.tensor(prepared.extra["label"], dtype=torch.int64)
        return batch

    def resize_on_cpu(self, decoded, prepared) -> torch.Tensor:
        """B x 3 x S x S in self.dtype from DALI's decoded H x W x 3 uint8 images (crops,
        already flipped, without jitter): jitter, crop and flip in torch when the graph decoded
        the whole image, torch's uint8 antialiased resize (PIL's filter), then one
        normalization of the batch."""
        with one_torch_thread():
            return self._resize_on_cpu(decoded, prepared)

    def _resize_on_cpu(self, decoded, prepared) -> torch.Tensor:
        size, count = self.cfg.img_size, len(prepared.keys)
        mode = self.cfg.interpolation
        anchors, shapes, mirrors, _, _, slots = prepared.inputs[1:]
        pixels = torch.empty(count, 3, size, size, dtype=torch.uint8)
        for i in range(count):
            hwc = torch.from_numpy(np.asarray(decoded[i]))
            if self.jitter:  # as the PIL path: the whole image, then its crop and flip
                hwc = jitter_uint8(hwc, slot_ops(slots[i]))
                (left, top), (w, h) = anchors[i].astype(int), shapes[i].astype(int)
                hwc = hwc[top:top + h, left:left + w]
                if mirrors[i]:
                    hwc = hwc.flip(1)
            nchw = hwc.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: the fast uint8 path
            if self.cfg.augment:
                img = _resize(nchw, size, size, mode)
            else:  # as images.resize_center_crop: short side to size, then the central square
                new_w, new_h, left, top = center_crop_geometry(hwc.shape[1], hwc.shape[0], size)
                img = _resize(nchw, new_h, new_w, mode)[..., top:top + size, left:left + size]
            pixels[i] = img[0]
        source = pixels.float()
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add over the batch
        source.mul_(1.0 / (255.0 * std)).sub_(mean / std)
        return source if source.dtype == self.dtype else source.to(self.dtype)


def _resize(nchw: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if nchw.shape[-2:] == (height, width):
        return nchw
    if not nchw.is_contiguous(memory_format=torch.channels_last):
        nchw = nchw.contiguous(memory_format=torch.channels_last)  # a cropped view is neither
    return F.interpolate(nchw, size=(height, width), mode=mode, antialias=True,
                         align_corners=False)
