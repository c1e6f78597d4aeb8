"""data2vec encoders per modality: build_model(model_cfg, modality) -> Data2VecEncoder."""
from d2v_engine.models.encoders import (
    AudioEncoder, Data2VecEncoder, EncoderOutput, ImageEncoder, TextEncoder, build_model,
)
from d2v_engine.models.transformer import Block, BlockStack, SelfAttention

__all__ = ["AudioEncoder", "Block", "BlockStack", "Data2VecEncoder", "EncoderOutput",
           "ImageEncoder", "SelfAttention", "TextEncoder", "build_model"]
