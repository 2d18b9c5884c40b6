"""flash-attn's two training kernels as exact torch equivalents, for CPU tests of the flash path.

`flash_attn_func` (batch x seq x heads x dim, one causal block per row) and
`flash_attn_varlen_func` (all tokens in one dimension, one block per [cu_seqlens[i], cu_seqlens[i+1]))
with flash-attn 2's signatures, computed with torch's sdpa. `installed()` puts them where
transformers keeps its loaded flash kernels (modeling_flash_attention_utils, the slots
`lazy_import_flash_attention` fills when a kernel is loaded), so a model whose config says
flash_attention_2 runs transformers' own dispatch unchanged (`_flash_attention_forward`,
`_is_packed_sequence`, ...) down to these kernels. Each kernel counts its calls in `CALLS`.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import transformers.modeling_flash_attention_utils as fa_utils

CALLS: Counter = Counter()
_SLOTS = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
          "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")


def _attend(q, k, v, softmax_scale, causal):
    """q [batch, seq_q, heads, dim], k/v [batch, seq_k, kv heads, dim] -> [batch, seq_q, heads, dim]."""
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError("causal attention with q and k of different lengths (flash aligns it bottom-right)")
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs):
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the emulation covers dense causal/non-causal attention only")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    CALLS["flash_attn_func"] += 1
    return _attend(q, k, v, softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _check_unsupported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    CALLS["flash_attn_varlen_func"] += 1
    out = torch.empty_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out[q0:q1] = _attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal)[0]
    return out


@contextlib.contextmanager
def installed():
    """The emulated kernels loaded as transformers' flash_attention_2 for the block (then restored)."""
    saved = {slot: getattr(fa_utils, slot) for slot in _SLOTS}
    fa_utils._loaded_implementation = "flash_attention_2"
    fa_utils._flash_fn, fa_utils._flash_varlen_fn, fa_utils._flash_with_kvcache_fn = (
        flash_attn_func, flash_attn_varlen_func, None)
    fa_utils._pad_fn, fa_utils._unpad_fn = fa_utils._pad_input, fa_utils._unpad_input
    fa_utils._process_flash_kwargs_fn = fa_utils._lazy_define_process_function(flash_attn_varlen_func)
    fa_utils._process_with_kvcache_kwargs_fn = dict
    CALLS.clear()
    try:
        yield
    finally:
        for slot, value in saved.items():
            setattr(fa_utils, slot, value)
