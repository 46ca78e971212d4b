"""Tokens per second of cached generation (`generate()` with the recurrent TTRCache: one new
token per step) against recomputation (the full forward over the whole sequence per token)."""

from __future__ import annotations

import time

import torch

from ttr.hf.model import TTRForCausalLM


@torch.no_grad()
def bench_generation(model: TTRForCausalLM, prompt_len: int, new_tokens: int,
                     batch: int = 1, seed: int = 0) -> dict[str, float]:
    """Greedy-decode `new_tokens` after a random prompt [batch, prompt_len] both ways; returns
    {"cached_tok_s", "recompute_tok_s", "speedup"} (new tokens per second, whole batch)."""
    if not isinstance(model, TTRForCausalLM):
        raise TypeError(f"model: expected a TTRForCausalLM, got {type(model).__name__}")
    for name, v in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    ids = ids.to(device)
    was_training = model.training
    model.eval()

    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0)
    cached = time.perf_counter() - t0

    t0 = time.perf_counter()
    seq = ids
    for _ in range(new_tokens):
        logits = model(seq, use_cache=False).logits  # [batch, T, V]
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    recompute = time.perf_counter() - t0

    model.train(was_training)
    n = batch * new_tokens
    return {"cached_tok_s": n / cached, "recompute_tok_s": n / recompute,
            "speedup": recompute / cached}


def generation_table(patterns: list[tuple[str, ...]], *, d_model: int = 192, n_layers: int = 4,
                     n_heads: int = 4, prompt_len: int = 32, new_tokens: int = 1024,
                     batch: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """bench_generation for a freshly initialized byte-level model per layer pattern (speed does
    not depend on the weights). One row per pattern, with the model's size."""
    from ttr.hf.model import TTRConfig

    rows = []
    for pattern in patterns:
        torch.manual_seed(seed)
        config = TTRConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           pattern=list(pattern))
        model = TTRForCausalLM(config)
        r = bench_generation(model, prompt_len, new_tokens, batch=batch, seed=seed)
        rows.append(dict(pattern="+".join(pattern),
                         params=sum(p.numel() for p in model.parameters()), **r))
        if progress is not None:
            progress(rows[-1])
    return rows
