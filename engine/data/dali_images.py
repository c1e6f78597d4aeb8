"""DALI image loader: the ImageFolderDataset's files decoded, cropped, flipped and normalized by DALI.

Same files and labels as images.ImageFolderDataset (class sub-folders, or a flat unlabelled folder)
and the same random draws: the RandomResizedCrop box and the flip come from the sample's numpy
generator exactly as the PIL path draws them (the box needs only the image size, read from the
file header), so DALI and PIL crop the same region. DALI then decodes only that region
(fn.decoders.image_slice, device="mixed" = nvJPEG on the GPU), resizes it to img_size with a
linear, antialiased filter (PIL's BILINEAR), flips and normalizes with the ImageNet mean/std in one
fn.crop_mirror_normalize: B x 3 x S x S float32 on the loader's device (cast to `dtype` there).
Without data.augment: short side to img_size, then the central square, as the PIL path.

On the CPU (device_id=None) DALI decodes the crop region and flips it on its threads, and the
resize runs in torch's uint8 antialiased bilinear kernel (the same filter as PIL's BILINEAR):
DALI's CPU resampler measured 4-5 ms per 500x375 -> 224 image on one core here, torch's 0.2 ms,
so DALI's resize alone made the CPU loader slower than the PIL fallback. The normalization then
runs once over the batch. On the GPU everything stays in the DALI graph.

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

from engine.data.common import bad_file
from engine.data.dali_common import DaliLoader, one_torch_thread
from engine.data.images import (
    CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataset, center_crop_geometry,
    random_resized_crop_box,
)

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

    num_inputs = 4  # encoded bytes, crop anchor (x, y), crop shape (w, h), mirror flag

    def __init__(self, dataset: ImageFolderDataset, *args, dtype: torch.dtype = torch.float32,
                 **kwargs):
        super().__init__(dataset, *args, **kwargs)
        from nvidia.dali import types

        self.input_dtypes = (types.UINT8, types.FLOAT, types.FLOAT, types.INT32)
        self.dtype = dtype
        self.cfg = dataset.cfg

    def path_of(self, index: int) -> str:
        return self.dataset.files[index]

    def prepare_sample(self, index: int, rng: np.random.Generator):
        path = self.dataset.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            width, height = image_size(data)
        except FileNotFoundError:
            raise bad_file(self.cfg.on_bad_file, path, "file not found") from None
        except (OSError, ValueError) as e:
            raise bad_file(self.cfg.on_bad_file, path, str(e)) from None
        if self.cfg.augment:
            box = random_resized_crop_box(width, height, self.cfg.crop_scale, CROP_RATIO, rng)
            left, top, w, h = box
            mirror = int(self.cfg.hflip and rng.random() < 0.5)
        else:  # the PIL path's draws are none; the graph resizes and center-crops
            left, top, w, h, mirror = 0, 0, width, height, 0
        arrays = [np.frombuffer(data, dtype=np.uint8),
                  np.array([left, top], dtype=np.float32), np.array([w, h], dtype=np.float32),
                  np.array(mirror, dtype=np.int32)]
        label = self.dataset.labels[index] if self.dataset.labels is not None else None
        return arrays, {"label": label}

    def plan_batch(self, prepared, facts) -> None:
        if self.dataset.labels is not None:
            prepared.extra["label"] = [f["label"] for f in facts]

    def graph(self, inputs, gpu: bool):
        from nvidia.dali import fn, types

        encoded, anchor, shape, mirror = inputs
        size = self.cfg.img_size
        decoder = "mixed" if gpu else "cpu"
        if not gpu:  # decode (and flip) only; finish() resizes (see the module docstring)
            if not self.cfg.augment:
                return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            img = fn.decoders.image_slice(encoded, anchor, shape, device="cpu",
                                          output_type=types.RGB, axis_names="WH",
                                          normalized_anchor=False, normalized_shape=False)
            # Flipping before the resize gives PIL's resize-then-flip: the filter is symmetric.
            return fn.flip(img, horizontal=mirror)
        if self.cfg.augment:
            img = fn.decoders.image_slice(encoded, anchor, shape, device=decoder,
                                          output_type=types.RGB, axis_names="WH",
                                          normalized_anchor=False, normalized_shape=False)
            img = fn.resize(img, size=[size, size], interp_type=types.INTERP_LINEAR,
                            antialias=True)
        else:
            img = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=size, interp_type=types.INTERP_LINEAR,
                            antialias=True)
        return fn.crop_mirror_normalize(
            img, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5,
            mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])

    def finish(self, prepared, outputs) -> dict:
        if self.gpu:
            source = self.to_torch(outputs[0], self.dtype)
        else:
            source = self.resize_on_cpu(outputs[0], len(prepared.keys))
        batch = {"source": source, "padding_mask": None}
        if "label" in prepared.extra:
            batch["label"] = torch.tensor(prepared.extra["label"], dtype=torch.int64)
        return batch

    def resize_on_cpu(self, decoded, count: int) -> torch.Tensor:
        """B x 3 x S x S in self.dtype from DALI's decoded (and flipped) H x W x 3 uint8 crops:
        torch's uint8 antialiased bilinear resize (PIL's BILINEAR filter), then one
        normalization of the batch."""
        with one_torch_thread():
            return self._resize_on_cpu(decoded, count)

    def _resize_on_cpu(self, decoded, count: int) -> torch.Tensor:
        size = self.cfg.img_size
        pixels = torch.empty(count, 3, size, size, dtype=torch.uint8)
        for i in range(count):
            hwc = torch.from_numpy(np.asarray(decoded[i]))
            nchw = hwc.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: the fast uint8 path
            if self.cfg.augment:
                img = _resize(nchw, size, size)
            else:  # as images.resize_center_crop: short side to size, then the central square
                new_w, new_h, left, top = center_crop_geometry(hwc.shape[1], hwc.shape[0], size)
                img = _resize(nchw, new_h, new_w)[..., top:top + size, left:left + size]
            pixels[i] = img[0]
        source = pixels.float()
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add over the batch
        source.mul_(1.0 / (255.0 * std)).sub_(mean / std)
        return source if source.dtype == self.dtype else source.to(self.dtype)


def _resize(nchw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if nchw.shape[-2:] == (height, width):
        return nchw
    return F.interpolate(nchw, size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)
