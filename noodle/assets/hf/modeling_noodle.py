"""A Noodle model in Hugging Face transformers (written by `noodle export`).

A pre-norm decoder: token embedding, blocks of x + Dropout(o_proj(Attn(LN(x)))) and
x + Dropout(down_proj(GELU(up_proj(LN(x))))), a final LayerNorm and a biased output layer.
Attention has one fused, biased QKV projection, a parameter-free RMS norm (in float32) on
each head's queries and keys, and rotate-half rotary positions applied after that norm.
The numbers are those of noodle's own model: the same inputs give the same logits.

Keys and values live in transformers' own cache (DynamicCache), so generate() works as
for any causal language model; ids of the padded vocabulary are never predicted.
"""

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_noodle import NoodleConfig

# transformers 5.2x renamed the cache argument and output field from past_key_values to cache.
CACHE_FIELD = (
    "cache"
    if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


def qk_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free RMS norm over each head's features, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding: x * cos + [-second half, first half] * sin, with the
    minus sign kept in the sin table."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin).type_as(x)


class RotaryTables:
    """cos and signed sin tables by position, computed in float64 on the CPU as noodle does
    (not every device has float64), kept on each device used and grown when needed.

    Plain tensors rather than module buffers: loading builds the model on the meta device
    and restores only the weights from the checkpoint.
    """

    def __init__(self, head_dim: int, base: float, length: int) -> None:
        self.head_dim, self.base, self.length = head_dim, base, length
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        angles = torch.outer(torch.arange(length, dtype=torch.float64), 1.0 / self.base**steps)
        sin = angles.sin()
        return torch.cat([angles, angles], -1).cos().float(), torch.cat([-sin, sin], -1).float()

    def __call__(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at `positions`, all of which are below `end`."""
        device = positions.device
        if device not in self.tables or self.tables[device][0].shape[0] < end:
            while self.length < end:
                self.length *= 2
            self.tables[device] = tuple(t.to(device) for t in self.compute(self.length))
        cos, sin = self.tables[device]
        return cos[positions], sin[positions]


class NoodleAttention(nn.Module):
    def __init__(self, config: NoodleConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qk_norm_eps = config.qk_norm_eps
        inner = config.num_attention_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=True)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=True)
        self.o_proj.residual_projection = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        qk = apply_rotary(
            qk_norm(qkv[:, :, :2], self.qk_norm_eps), cos[:, :, None, None], sin[:, :, None, None]
        )
        q, k = qk.permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Without a mask, the queries are the whole sequence (causal) or one new token
        # (it sees everything cached).
        causal = mask is None and length > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class NoodleMLP(nn.Module):
    def __init__(self, config: NoodleConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.down_proj.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class NoodleDecoderLayer(nn.Module):
    def __init__(self, config: NoodleConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = NoodleAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = NoodleMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class NoodlePreTrainedModel(PreTrainedModel):
    config_class = NoodleConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["NoodleDecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: generate() may give it a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        """Noodle's initialisation, for a model made from a config rather than loaded:
        N(0, 0.02), the residual projections scaled down by depth."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std /= (2 * self.config.num_hidden_layers) ** 0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def attention_mask_for(
    attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean (batch, 1, length, past + length) mask of what each new query may read,
    or None when causal attention over the inputs (or one query reading all) is enough.

    A query always sees its own position, so that the rows of padding positions are not
    empty (empty rows give NaN); what padding positions compute is never read.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        return attention_mask  # already expanded by the caller
    unpadded = attention_mask is None or bool(attention_mask.all())
    if unpadded and (past == 0 or length == 1):
        return None
    slots = torch.arange(past + length, device=device)
    positions = past + torch.arange(length, device=device)
    mask = (slots[None, :] <= positions[:, None])[None, None]
    if not unpadded:
        mask = mask & attention_mask[:, None, None, : past + length].bool()
        mask = mask | (slots[None, :] == positions[:, None])[None, None]
    return mask


class NoodleModel(NoodlePreTrainedModel):
    """The decoder without its output layer: the final hidden states."""

    def __init__(self, config: NoodleConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            NoodleDecoderLayer(config, index) for index in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryTables(
            config.head_dim, config.rope_theta, config.max_position_embeddings
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = past_key_values if past_key_values is not None else DynamicCache()
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is not None:
            end = int(position_ids.max()) + 1
        elif attention_mask is not None and attention_mask.ndim == 2:
            # Left padding: positions count the real tokens only.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            end = past + length
        else:
            position_ids = (past + torch.arange(length, device=device)).expand(batch, -1)
            end = past + length
        cos, sin = self.rotary(position_ids, end)
        mask = attention_mask_for(attention_mask, past, length, device)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, mask, cache)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_FIELD: cache}
        )


class NoodleForCausalLM(NoodlePreTrainedModel, GenerationMixin):
    def __init__(self, config: NoodleConfig) -> None:
        super().__init__(config)
        self.model = NoodleModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of every position (or of the last `logits_to_keep`); with `labels`, also
        the mean next-token cross-entropy (labels are shifted here; -100 is skipped)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:]  # 0 keeps them all
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        # The padded vocabulary's ids are never predicted.
        logits[..., self.config.tokenizer_vocab_size :] = float("-inf")
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )
