"""A Llama / Qwen2-style decoder-only language model.

Module and parameter names follow the HF layout without its ``model.`` prefix
(``embed_tokens``, ``layers.{i}.self_attn.q_proj``, ``layers.{i}.mlp.gate_proj``, ``norm``,
``lm_head``), so ``distflow.models.hf`` maps checkpoints by renaming keys only.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` keys (cached + new), ``H`` hidden size,
``V`` vocab, ``nh`` query heads, ``nkv`` key/value heads, ``d`` head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distflow.models.cache import KVCache
from distflow.models.config import ModelConfig
from distflow.models.rope import inv_frequencies

__all__ = ["DecoderLM", "KVCache", "RMSNorm", "rotary_cos_sin", "apply_rotary", "attention_mask"]


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., H]`` -> ``[..., H]``."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---------------------------------------------------------------------------- rotary
def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                   scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)``, each ``[B, T, d]``, for integer ``position_ids [B, T]``.

    Frequencies ``theta ** (-2i / d)`` for ``i < d/2`` as rescaled by the rotary ``scaling``
    (``ModelConfig.rope_scaling``, see ``distflow.models.rope``), repeated for both halves of
    the head (the "rotate half" layout of Llama / Qwen2 checkpoints).
    """
    inv_freq, attention_scaling = inv_frequencies(head_dim, theta, scaling, position_ids.device)  # [d/2]
    freqs = position_ids.float()[..., None] * inv_freq                    # [B, T, d/2]
    angles = torch.cat((freqs, freqs), dim=-1)                            # [B, T, d]
    if attention_scaling == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_scaling, angles.sin() * attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, d]`` by ``cos, sin [B, T, d]``; computed in fp32, returned in x's dtype."""
    x32 = x.float()
    cos, sin = cos[:, None], sin[:, None]
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


# ---------------------------------------------------------------------------- masks
def attention_mask(key_mask: torch.Tensor | None, num_new: int, num_cached: int,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean ``[B or 1, 1, T, S]`` mask (True = may attend), or ``None`` when attention is plain
    causal with ``S == T`` or a single query sees every key (the caller then uses SDPA's
    ``is_causal`` for ``T > 1``).

    Query ``i`` (slot ``num_cached + i``) sees key ``j`` iff ``j <= num_cached + i`` and
    ``key_mask[:, j]``. A query always sees its own key, so a padding query whose row has no
    real key yet still gets a finite (ignored) output instead of NaN.
    """
    total = num_cached + num_new
    if key_mask is None and (num_new == 1 or num_cached == 0):
        return None  # one new token sees every key; or plain causal, T == S (SDPA is_causal)
    q_slot = torch.arange(num_cached, total, device=device)[:, None]      # [T, 1]
    k_slot = torch.arange(total, device=device)[None, :]                  # [1, S]
    causal = k_slot <= q_slot                                             # [T, S]
    if key_mask is None:
        return causal[None, None]
    allowed = (causal[None] & key_mask[:, None, :]) | (k_slot == q_slot)[None]  # [B, T, S]
    return allowed[:, None]


# Projections are fused (one matmul against stacked weights, stacked at every call) only
# for small weights, where time goes per op; above this many elements (of the q / gate
# weight) stacking costs more than the ops it saves: at hidden 512 it was 17% of a decode
# step (a copy of every weight per token), so larger models run the projections apart.
FUSE_MAX_WEIGHT = 1 << 16


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, nkv, S, d]`` -> ``[B, nkv * n_rep, S, d]`` (query head ``h`` uses kv head ``h // n_rep``)."""
    if n_rep == 1:
        return x
    b, nkv, s, d = x.shape
    return x[:, :, None].expand(b, nkv, n_rep, s, d).reshape(b, nkv * n_rep, s, d)


# ---------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, config.q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, h, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``x [B, T, H]``, ``cos/sin [B, T, d]``, ``mask [B|1, 1, T, S] | None`` -> ``[B, T, H]``.

        ``mask=None`` means plain causal attention over ``S == T`` keys, or (``T == 1``)
        every key.
        """
        b, t, _ = x.shape
        if self._fusable():
            q, k, v = self._qkv_fused(x, cos, sin)
        else:
            q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                              # [B, nkv, S, d]
        n_rep = self.num_heads // self.num_kv_heads
        if t == 1 and n_rep > 1:
            # Decode step: fold the heads sharing a kv head into the query axis, so the cache
            # is read once instead of being repeated n_rep times. mask [B,1,1,S] broadcasts.
            out = F.scaled_dot_product_attention(
                q.reshape(b, self.num_kv_heads, n_rep, self.head_dim), k, v, attn_mask=mask)
            out = out.reshape(b, self.num_heads, 1, self.head_dim)
        else:
            causal = mask is None and t > 1
            out = F.scaled_dot_product_attention(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep),
                                                 attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


    def _fusable(self) -> bool:
        return (self.q_proj.weight.numel() <= FUSE_MAX_WEIGHT
                and all(type(m) is nn.Linear for m in (self.q_proj, self.k_proj, self.v_proj)))

    def _qkv_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``q, k, v`` as the three projections + rotary compute them, with fewer ops (for
        small models, where time goes per op): one matmul against the stacked weights, and
        the rotary of q and k heads at once, in fp32, with ``rotate_half(x) * sin`` written
        as ``roll(x, d/2) * [-sin_1, sin_2]`` (the same products, bit for bit)."""
        b, t, _ = x.shape
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        biases = (self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        bias = None if all(bb is None for bb in biases) else torch.cat(
            [bb if bb is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
             for bb, m in zip(biases, (self.q_proj, self.k_proj, self.v_proj))])
        qkv = F.linear(x, weight, bias)
        qk = qkv[..., :(nh + nkv) * d].view(b, t, nh + nkv, d)
        v = qkv[..., (nh + nkv) * d:].view(b, t, nkv, d).transpose(1, 2)
        qk32 = qk.float()
        half = d // 2
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None]
        qk = (qk32 * cos[:, :, None] + qk32.roll(half, -1) * signed_sin).to(qk.dtype)
        return qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2), v


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` -> ``[B, T, H]``."""
        if type(self.gate_proj) is nn.Linear and type(self.up_proj) is nn.Linear \
                and self.gate_proj.bias is None and self.up_proj.bias is None \
                and self.gate_proj.weight.numel() <= 2 * FUSE_MAX_WEIGHT:
            # gate and up in one matmul against the stacked weights (fewer ops)
            gate, up = F.linear(x, torch.cat([self.gate_proj.weight, self.up_proj.weight])).chunk(2, -1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """``[B, T, H]`` -> ``[B, T, H]``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------- model
class DecoderLM(nn.Module):
    """Token embedding -> ``num_hidden_layers`` blocks -> RMSNorm -> ``lm_head``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Linear and embedding weights ~ N(0, std), biases 0, norm weights 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``embed_tokens.weight`` when ``tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False, inputs_embeds: torch.Tensor | None = None,
                logits: bool = True):
        """Next-token logits.

        Args:
            input_ids: ``LongTensor [B, T]``.
            position_ids: ``LongTensor [B, T]`` rotary positions; default
                ``arange(T) + cache.length``. For left-padded rows pass positions counting from
                0 at each row's first real token.
            key_mask: ``BoolTensor [B, S]``, ``S = T`` without a cache and
                ``cache.length + T`` with one; False marks padding keys, never attended.
                A causal mask is always applied on top. Or ``BoolTensor [B, T, S]``: the
                whole mask (query ``i`` may attend key ``j``), applied as given (e.g. the
                block mask of packed sequences); each query must be allowed some key.
            cache: a ``KVCache``; this call writes slots ``[length, length + T)`` of every
                layer and advances ``cache.length`` by ``T``.
            return_hidden: also return the final (normed) hidden states.
            inputs_embeds: ``[B, T, H]`` used instead of ``embed_tokens(input_ids)`` (e.g. with
                image embeddings scattered in); ``input_ids`` then only gives the shape.
            logits: False skips ``lm_head`` and returns only the final (normed) hidden
                states, for callers that apply the head themselves chunk by chunk
                (``distflow.algos.logprobs_from_hidden``: the [B, T, V] logits of a large
                vocabulary are never made).

        Returns:
            ``logits [B, T, V]`` in the parameter dtype, or ``(logits, hidden [B, T, H])``,
            or (``logits=False``) ``hidden [B, T, H]``. Rows at padding queries are finite
            but meaningless.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("input_ids has no tokens (T = 0)")
        device = input_ids.device
        past = 0
        if cache is not None:
            if cache.num_layers != len(self.layers):
                raise ValueError(f"cache has {cache.num_layers} layers, model has {len(self.layers)}")
            cache.check_fits(b, t)
            past = cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        elif tuple(position_ids.shape) != (b, t):
            raise ValueError(f"position_ids must be [B, T] = [{b}, {t}], got {tuple(position_ids.shape)}")
        if key_mask is not None and key_mask.dim() == 3:  # the whole mask, used as given
            if tuple(key_mask.shape) != (b, t, past + t):
                raise ValueError(f"a 3-D key_mask must be [B, T, S] = [{b}, {t}, {past + t}], "
                                 f"got {tuple(key_mask.shape)}")
            mask = key_mask.to(device=device, dtype=torch.bool)[:, None]
        else:
            if key_mask is not None:
                if tuple(key_mask.shape) != (b, past + t):
                    raise ValueError(f"key_mask must be [B, S] = [{b}, {past + t}] ({past} cached + {t} new), "
                                     f"got {tuple(key_mask.shape)}")
                key_mask = key_mask.to(device=device, dtype=torch.bool)
            mask = attention_mask(key_mask, t, past, device)
        cos, sin = rotary_cos_sin(position_ids.to(device), self.config.head_dim, self.config.rope_theta,
                                  self.config.rope_scaling)

        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        h = self.norm(h)
        if not logits:
            return h
        out = self.lm_head(h)
        return (out, h) if return_hidden else out
