"""data2vec encoders per modality."""
from engine.models.encoders import EncoderOutput, build_model

__all__ = ["EncoderOutput", "build_model"]
