"""Hugging Face processors that reproduce d2v-engine's evaluation inputs exactly.

d2v_engine.handoff.export copies this file verbatim into an export as `d2v_processing.py` and names its classes
in the processor config's `auto_map`, so it must import nothing from d2v-engine. Loading with
`trust_remote_code=True` gives these classes; without it transformers builds the stock class the
config also names (Wav2Vec2FeatureExtractor, BeitImageProcessor), which differs as said below.

    audio  D2VFeatureExtractor: the stock per-utterance normalization divides by sqrt(var + 1e-7);
           our loader's (fairseq's F.layer_norm over the utterance) by sqrt(var + 1e-5).
    image  D2VImageProcessor: BEiT's PIL processor with torchvision's center-crop offset
           round((size - crop) / 2) where the stock one floors it (a 1-pixel shift when the
           difference is 3 mod 4), and PIL's plain convert("RGB") where the stock one composites
           transparency onto white.
"""
from __future__ import annotations

import numpy as np
from transformers import Wav2Vec2FeatureExtractor
from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil


class D2VFeatureExtractor(Wav2Vec2FeatureExtractor):
    """Wav2Vec2FeatureExtractor whose normalization is (x - mean) / sqrt(var + normalize_eps)."""

    def __init__(self, normalize_eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.normalize_eps = normalize_eps

    def zero_mean_unit_var_norm(self, input_values, attention_mask=None, padding_value=0.0):
        """Each utterance (its unpadded part when a mask is given) normalized in float64."""
        lengths = ([len(x) for x in input_values] if attention_mask is None
                   else np.asarray(attention_mask, np.int64).sum(-1))
        out = []
        for x, n in zip(input_values, lengths):
            real = np.asarray(x[:n], dtype=np.float64)
            normed = np.full(len(x), padding_value, dtype=np.float32)
            normed[:n] = (real - real.mean()) / np.sqrt(real.var() + self.normalize_eps)
            out.append(normed)
        return out


class D2VImageProcessor(BeitImageProcessorPil):
    """BEiT's PIL image processor with torchvision's center-crop rounding and RGB conversion."""

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """C x H x W -> C x crop_h x crop_w, offsets round((H - crop_h) / 2) as torchvision."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # pads: never on our resize path
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top:top + size.height, left:left + size.width]

    def convert_to_rgb(self, image, input_data_format=None):
        """PIL images through Image.convert("RGB") (alpha dropped), as our loader decodes them."""
        if hasattr(image, "convert"):
            return np.array(image.convert("RGB"))
        return super().convert_to_rgb(image, input_data_format=input_data_format)
