"""The last block of a class-token ViT, run for its class token alone.

A timm ``VisionTransformer`` with ``global_pool="token"`` embeds an image as its class
token after the last block and the final norm. Inside the last block only the attention
mixes tokens; everything after it (the attention output projection, the residuals, the
MLP, the norms) is per token. So the class token's output needs the keys and values of
every token but the query of the class token only, and the projection, MLP and norms of
that one token: ``N - 1`` of the last block's ``N`` rows are skipped (about 6% of a
ViT-S/16 forward at 224 px). The embedding is the same up to float rounding, and so is
every gradient taken at or after the last block's attention projection (the default
FUNGI layer): the other tokens' outputs never reach the loss, their gradients are zero.

:func:`class_token_tail_applies` says when a model has exactly this structure (timm's own
``VisionTransformer``, ``Block`` and ``Attention`` classes, class-token pooling, eval
mode); :func:`class_token_embedding` is then ``forward_head(forward_features(x),
pre_logits=True)``, shape ``(N, D)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def class_token_tail_applies(model: nn.Module) -> bool:
    """Whether ``model``'s last block may be run for the class token alone (see above)."""
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    if type(model) is not VisionTransformer or model.training or len(model.blocks) == 0:
        return False
    last = model.blocks[-1]
    return (
        model.global_pool == "token"
        and model.attn_pool is None
        and model.num_prefix_tokens >= 1
        and type(last) is Block
        and type(last.attn) is Attention
        and getattr(last.attn, "gate", None) is None
    )


def _class_token_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward`` for the class token: ``(B, N, C)`` → ``(B, 1, C)``."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, head_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, 1, -1))))
    y = x[:, :1] + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


@contextmanager
def _last_block_for_class_token(model: nn.Module) -> Iterator[None]:
    last = model.blocks[-1]
    last.forward = lambda x, *args, **kwargs: _class_token_block(last, x)
    try:
        yield
    finally:
        del last.forward  # back to the class's own forward


def class_token_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled embedding ``(N, D)`` of images ``x`` ``(N, 3, H, W)``, normalised for the
    model; ``model`` must satisfy :func:`class_token_tail_applies`."""
    with _last_block_for_class_token(model):
        return model.forward_head(model.forward_features(x), pre_logits=True)
