"""The configuration of a Noodle model in Hugging Face transformers (written by `noodle export`)."""

from transformers import PretrainedConfig


class NoodleConfig(PretrainedConfig):
    """Noodle's architecture numbers under transformers' usual names.

    `vocab_size` is the model's vocabulary, padded to a multiple of 128 for fast matrix
    shapes; ids from `tokenizer_vocab_size` up are padding, which the model never predicts.
    """

    model_type = "noodle"

    def __init__(
        self,
        vocab_size: int = 50304,
        tokenizer_vocab_size: int = 50277,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        head_dim: int = 64,
        intermediate_size: int = 1024,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        qk_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = 1,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.qk_norm_eps = qk_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False  # the output layer has its own weights
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
