"""Configuration of a data2vec 2.0 image encoder (written by d2v-engine's export)."""
from transformers import PretrainedConfig


class Data2Vec2VisionConfig(PretrainedConfig):
    """Patch embedding, CLS, optional learned absolute positions or shared relative position bias,
    a LayerNorm on the blocks' input, post-LN transformer blocks, no final norm."""

    model_type = "data2vec2-vision"

    def __init__(self, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, layer_norm_eps=1e-6, image_size=224, patch_size=16,
                 num_channels=3, use_absolute_position_embeddings=True,
                 use_shared_relative_position_bias=False, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self.use_shared_relative_position_bias = use_shared_relative_position_bias
        self.initializer_range = initializer_range
