"""Softmax attention = the locally constant (Nadaraya-Watson) nonparametric regressor.

Objective (paper Eq. 48 with p = 0, Eq. 50): for each query q_t fit a constant m to the values,
weighting pair i by a similarity to the query,

    m_t(q_t) = argmin_m 1/2 sum_{i<=t} s(k_i, q_t) ||v_i - m||^2 = sum_i s_i v_i / sum_j s_j.

Two similarities:
  scale      s(k, q) = exp(scale * k.q), standard causal softmax attention (Eq. 1; default
             scale 1/sqrt(Dk)).
  bandwidth  the Gaussian smoothing kernel s(k, q) = exp(-||k - q||^2 / bandwidth) (Eq. 48).
             Since -||k - q||^2 = 2 q.k - ||k||^2 - ||q||^2 and the ||q||^2 term is constant
             over i, it cancels in the normalization; so with q' = [q, 1], k' = [k, -||k||^2/2]
             and scale 2/bandwidth, softmax(scale q'.k') is exactly the Gaussian-kernel
             estimator (Eq. 51 is the unit-norm special case, bandwidth 2 sqrt(Dk)).

The memory is nonparametric: the state is the KV cache, a pair (K [B, Tc, H, Dk],
V [B, Tc, H, Dv]) of every key/value seen. With `initial_state` the queries attend to the cached
keys and their own causal prefix; `output_final_state` returns the concatenated cache.

Forms
  fused      torch.nn.functional.scaled_dot_product_attention (causal).
  recurrent  the weighted mean of Eq. 50, one query at a time over the growing cache, with a
             max-subtracted exp (the spec).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ttr.ops.common import (
    check_causal,
    check_cu_seqlens,
    check_form,
    check_qkv,
    check_state,
    check_step_qkv,
    check_tensor,
    compute_dtype,
    varlen,
)

FORMS = ("fused", "recurrent")


def softmax_attention(q, k, v, *, scale=None, bandwidth=None, initial_state=None,
                      output_final_state=False, cu_seqlens=None, form="fused", causal=True):
    """Causal softmax attention / Gaussian-kernel Nadaraya-Watson regression.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; scale: float (default 1/sqrt(Dk)) or bandwidth:
    float > 0 (then scale must be None); initial_state: (K [B, Tc, H, Dk], V [B, Tc, H, Dv]).
    With cu_seqlens, initial_state is a pair with leading dim N (one cache per sequence, same
    Tc) or a list of N pairs, and the final state is a list of N pairs (caches differ in length).
    causal=False lets every query see every key of the call (and the cache): the regressor
    fitted to the whole sequence (an encoder's attention).
    Returns o [B, T, H, Dv] (dtype of q) and the final cache or None.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    _check_similarity(scale, bandwidth)
    check_causal(causal)
    check_form(form, FORMS)
    check_cu_seqlens(cu_seqlens, q)
    return with_caches(
        lambda q, k, v, cache, final: _attend(q, k, v, scale, bandwidth, cache, final, form,
                                              causal),
        q, k, v, initial_state, output_final_state, cu_seqlens)


def softmax_attention_step(q_t, k_t, v_t, state=None, *, scale=None, bandwidth=None):
    """One decoding step: append (k_t, v_t) to the cache and read it with q_t.

    q_t, k_t [B, H, Dk], v_t [B, H, Dv]; state None or (K [B, Tc, H, Dk], V [B, Tc, H, Dv]).
    Returns (o_t [B, H, Dv], (K, V) with Tc + 1 entries).
    """
    B, H, Dk, Dv = check_step_qkv(q_t, k_t, v_t)
    _check_similarity(scale, bandwidth)
    _check_cache("state", state, B, H, Dk, Dv, q_t)
    K, V = k_t.unsqueeze(1), v_t.unsqueeze(1)  # [B, 1, H, D]
    if state is not None:
        K, V = torch.cat([state[0].to(K.dtype), K], 1), torch.cat([state[1].to(V.dtype), V], 1)
    return _read(q_t, K, V, scale, bandwidth), (K, V)


# -- validation ------------------------------------------------------------------------------------

def _check_similarity(scale, bandwidth) -> None:
    if scale is not None and bandwidth is not None:
        raise ValueError("scale: the Gaussian kernel (bandwidth) fixes its own scale 2/bandwidth; "
                         f"expected scale=None with bandwidth={bandwidth!r}, got {scale!r}")
    for name, x, low in (("scale", scale, None), ("bandwidth", bandwidth, 0.0)):
        if x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(x).__name__} {x!r}")
        if not math.isfinite(x) or (low is not None and x <= low):
            raise ValueError(f"{name}: expected a finite value{' > 0' if low is not None else ''}"
                             f", got {x!r}")


def with_caches(attend, q, k, v, initial_state, output_final_state, cu_seqlens):
    """The (K, V)-cache ops' shared entry: one call, or packed sequences with a cache each.
    `attend(q, k, v, cache, output_final_state) -> (o, cache or None)` on one batch."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    if cu_seqlens is None:
        _check_cache("initial_state", initial_state, B, H, Dk, Dv, q)
        return attend(q, k, v, initial_state, output_final_state)
    caches = split_caches(initial_state, cu_seqlens.numel() - 1, H, Dk, Dv, q)
    return varlen_caches(lambda cache, q, k, v: attend(q, k, v, cache, True), cu_seqlens,
                         {"q": q, "k": k, "v": v}, caches, output_final_state)


def varlen_caches(attend, cu_seqlens, tensors: dict, caches: list, output_final_state: bool):
    """Packed sequences for a KV-cache op: `attend(cache_i, **tensors_i) -> (o_i, cache_i')`.
    varlen stacks final states on a leading dim, which caches of different lengths cannot
    share, so each sequence's cache is collected here and varlen only re-packs the outputs."""
    finals = []

    def run(initial_state, output_final_state, **piece):
        o, s = attend(caches[len(finals)], **piece)
        finals.append(s)
        return o, None

    o, _ = varlen(run, cu_seqlens, tensors, None, False)
    return o, (finals if output_final_state else None)


def split_caches(initial_state, N, H, Dk, Dv, q, check=None) -> list:
    """Packed KV caches, one per sequence: a list of N caches (their lengths may differ) or one
    cache with a leading N dimension; validated (`check`, default a (K, V) pair) and returned as
    a list of N caches."""
    check = check or _check_cache
    if isinstance(initial_state, list):
        if len(initial_state) != N:
            raise ValueError(f"initial_state: expected a list of N={N} caches (one per packed "
                             f"sequence), got {len(initial_state)}")
        for i, s in enumerate(initial_state):
            check(f"initial_state[{i}]", s, 1, H, Dk, Dv, q)
        return initial_state
    check("initial_state", initial_state, N, H, Dk, Dv, q)
    return [None if initial_state is None else tuple(x[i:i + 1] for x in initial_state)
            for i in range(N)]


def _check_cache(name, s, B, H, Dk, Dv, ref) -> None:
    if s is None:
        return
    if not isinstance(s, (tuple, list)) or len(s) != 2:
        raise TypeError(f"{name}: expected a KV cache pair (K, V), got {type(s).__name__}")
    check_tensor(f"{name}[0] (K)", s[0], 4)
    Tc = s[0].shape[1]
    check_state(f"{name}[0] (K)", s[0], (B, Tc, H, Dk), "[B, Tc, H, Dk]", ref)
    check_state(f"{name}[1] (V)", s[1], (B, Tc, H, Dv), "[B, Tc, H, Dv]", ref)


# -- forms -------------------------------------------------------------------------------------

def _attend(q, k, v, scale, bandwidth, cache, output_final_state, form, causal=True):
    K, V = k, v
    if cache is not None:
        K, V = torch.cat([cache[0].to(k.dtype), k], 1), torch.cat([cache[1].to(v.dtype), v], 1)
    # cached steps before this call; non-causal = every key counts as cached before query 0
    Tc = K.shape[1] - q.shape[1] if causal else K.shape[1]
    if form == "fused":
        o = _fused(q, K, V, scale, bandwidth, Tc)
    else:
        o = torch.stack([_read(q[:, t], K[:, :Tc + t + 1], V[:, :Tc + t + 1], scale, bandwidth)
                         for t in range(q.shape[1])], dim=1)  # [B, T, H, Dv]
    return o, ((K, V) if output_final_state else None)


def _fused(q, K, V, scale, bandwidth, Tc):
    """SDPA on [B, H, T, D]; query t (global position Tc + t) sees keys 0 .. Tc + t."""
    out_dtype, dt = q.dtype, compute_dtype(q)
    q, K, V = q.to(dt), K.to(dt), V.to(dt)
    if bandwidth is not None:
        # 1. augment so that (2/bandwidth) q'.k' = -(||k - q||^2 - ||q||^2) / bandwidth
        q = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)  # [B, T, H, Dk+1]
        K = torch.cat([K, -0.5 * (K * K).sum(-1, keepdim=True)], dim=-1)  # [B, Tc+T, H, Dk+1]
        s = 2.0 / bandwidth
    else:
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    # 2. causal mask aligned to the end: SDPA's is_causal aligns to the top-left corner,
    #    which is only right without a cache
    T, L = q.shape[1], K.shape[1]
    mask = None
    if Tc > 0:
        mask = torch.arange(L, device=q.device) <= Tc + torch.arange(T, device=q.device)[:, None]
    # 3. one head width for q, K and V (zero columns change no score and no output column):
    #    SDPA's CPU flash kernel needs it and otherwise falls back to its math path, the whole
    #    [T, L] weight matrix with a mask pass. With a bandwidth (Dk + 1 against Dv), one thread,
    #    B = 64, T = 1024, D = 64, forward + backward: 0.86 -> 0.38 s of CPU time
    dk, dv = q.shape[-1], V.shape[-1]
    if dk < dv:
        q, K = F.pad(q, (0, dv - dk)), F.pad(K, (0, dv - dk))
    elif dv < dk:
        V = F.pad(V, (0, dk - dv))
    o = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None, scale=s)
    return o[..., :dv].transpose(1, 2).to(out_dtype)


def _read(q, K, V, scale, bandwidth):
    """Eq. 50 for one query: q [B, H, Dk], K [B, L, H, Dk], V [B, L, H, Dv] -> [B, H, Dv]."""
    out_dtype = q.dtype
    dt = compute_dtype(q)
    q, K, V = q.to(dt), K.to(dt), V.to(dt)
    if bandwidth is not None:
        logits = -((K - q.unsqueeze(1)) ** 2).sum(-1) / bandwidth  # [B, L, H]
    else:
        s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        logits = s * (K * q.unsqueeze(1)).sum(-1)  # [B, L, H]
    # the max cancels between numerator and denominator; subtracting it keeps exp <= 1
    w = torch.exp(logits - logits.amax(dim=1, keepdim=True))  # [B, L, H]
    o = (w.unsqueeze(-1) * V).sum(1) / w.sum(1).unsqueeze(-1)  # [B, H, Dv]
    return o.to(out_dtype)
