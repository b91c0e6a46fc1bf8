"""Self-attention exported as ONNX Runtime's fused com.microsoft MultiHeadAttention (CPU int8 exports).

The stock export of a diffusers self-attention (attn1) is to_q/to_k/to_v MatMuls, Reshape + Transpose per head,
Q.K^T, Softmax, P.V, Transpose + Reshape back, to_out. ORT's CPU MultiHeadAttention kernel does the middle part in
one node (the heads split inside, scores and softmax per head block): faster on 1024-token layers of the SD 1.5
shape, slower on small ones (MIN_TOKENS; benchmarks/results/int8-unet-profile.md). to_q/to_k/to_v and to_out stay plain Linear -> MatMul nodes,
so the int8 quantiser still sees (and quantises) them; cross-attention (attn2) is left as it is, so its K/V stay
plain MatMuls on encoder_hidden_states. ORT-only (a contrib op): the int8 export (sdrt.export.int8_export), which
only ONNX Runtime's CPU provider runs, asks for it; eager PyTorch (the export's probe and parity check) computes
scaled_dot_product_attention, the same arithmetic.
"""

from __future__ import annotations

from contextlib import contextmanager

from sdrt.export.winograd import LazyFunction


def fusable(m) -> bool:
    """A diffusers self-attention module whose processor the fused form reproduces: no group/spatial/q-k norms, no
    residual or rescale inside, diffusers' default SDPA processor."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    except ImportError:  # pragma: no cover - export always has diffusers
        return False
    return (isinstance(m, Attention) and not m.is_cross_attention and type(m.processor) is AttnProcessor2_0
            and m.spatial_norm is None and m.group_norm is None and m.norm_q is None and m.norm_k is None
            and not m.residual_connection and m.rescale_output_factor == 1.0 and not m.only_cross_attention)


class FusedSelfAttention:
    """An attention processor: MultiHeadAttention on the projections for self-attention on 3-D input without a
    mask; anything else goes to the processor it replaced."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = multi_head_attention(q, k, v, attn.heads)
        return attn.to_out[1](attn.to_out[0](out))


# Fused only where a self-attention sees at least this many tokens at the export's opt size: on the SD 1.5-shape int8
# UNet at 256 px the five 1024-token layers together took the call to 0.962x, while fusing the 256-, 64- and 16-token
# ones too gave 0.985x (the fused kernel loses to the stock MatMuls on small score matrices; int8-unet-profile.md).
MIN_TOKENS = 1024


@contextmanager
def fused_self_attention(module, example_args=None, opt_scale: float = 1.0, enabled: bool = True,
                         min_tokens: int = MIN_TOKENS):
    """Within the block, the fusable self-attentions of `module` that see at least `min_tokens` tokens at the opt size
    export as MultiHeadAttention; yields how many. example_args: inputs for a probe pass that measures each one's
    tokens (scaled by opt_scale, the opt size over the example's, squared); None fuses every fusable one."""
    candidates = [m for m in module.modules() if enabled and fusable(m)]
    if candidates and example_args is not None:
        from sdrt.export.rewrites import input_sizes

        tokens = input_sizes(module, example_args, lambda m: m in candidates)  # (tokens, channels) per attention
        candidates = [m for m in candidates if m in tokens and round(tokens[m][0] * opt_scale**2) >= min_tokens]
    swapped = {m: m.processor for m in candidates}
    for m, original in swapped.items():
        m.processor = FusedSelfAttention(original)
    try:
        yield len(swapped)
    finally:
        for m, original in swapped.items():
            m.processor = original


def multi_head_attention(q, k, v, heads: int):
    """softmax(Q K^T / sqrt(d)) V per head of (batch, tokens, heads * d) inputs; exports as one MultiHeadAttention."""
    return _MultiHeadAttention.apply(q, k, v, heads)


def _sdpa(q, k, v, heads: int):
    import torch.nn.functional as F

    b, s, inner = q.shape
    d = inner // heads
    split = lambda x: x.reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, -1, inner)


def _make_function():
    import torch

    class MultiHeadAttention(torch.autograd.Function):
        """com.microsoft MultiHeadAttention for the torchscript exporter; scaled_dot_product_attention elsewhere."""

        @staticmethod
        def forward(ctx, q, k, v, heads):
            return _sdpa(q, k, v, heads)

        @staticmethod
        def symbolic(g, q, k, v, heads):
            out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
            out.setType(q.type())
            return out

    return MultiHeadAttention


_MultiHeadAttention = LazyFunction(_make_function)
