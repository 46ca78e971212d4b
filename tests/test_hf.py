"""transformers integration: cached generation equals recomputation, padding is exact, the
checkpoint round-trips, the Auto classes know model_type "ttr"."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from ttr.hf import TTRCache, TTRConfig, TTRForCausalLM, TTRModel  # noqa: E402
from ttr.hf.bench import bench_generation  # noqa: E402
from ttr.testing import assert_close  # noqa: E402

HYBRID = ["gated_deltanet", "gated_deltanet", "softmax_attention"]
PATTERNS = [HYBRID, ["mesa"]]


def make(pattern, seed=0, dtype=torch.float64, **kw) -> TTRForCausalLM:
    torch.manual_seed(seed)
    cfg = TTRConfig(vocab_size=32, d_model=16, n_layers=len(pattern) if len(pattern) > 1 else 2,
                    n_heads=2, pattern=pattern, **kw)
    return TTRForCausalLM(cfg).to(dtype).eval()


def greedy_by_recompute(model, ids, new_tokens):
    """The reference: re-run the full forward over the whole sequence for every new token."""
    for _ in range(new_tokens):
        logits = model(ids, use_cache=False).logits  # [B, T, V]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("pattern", PATTERNS, ids=["hybrid", "mesa"])
def test_generate_with_cache_equals_recompute(pattern):
    model = make(pattern)
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
        want = greedy_by_recompute(model, ids, 8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("pattern", PATTERNS, ids=["hybrid", "mesa"])
def test_prefill_then_steps_equals_full_forward(pattern):
    model = make(pattern)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # [B, 12, V]
        out = model(ids[:, :5], use_cache=True)
        cache, parts = out.past_key_values, [out.logits]
        assert isinstance(cache, TTRCache) and cache.get_seq_length() == 5
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            parts.append(out.logits)
    assert_close(torch.cat(parts, dim=1), full, tol=1e-8, what="prefill + steps")


def test_cache_argument_under_either_name():
    """transformers 5.24 renamed past_key_values to cache (generate() passes cache=): both
    names continue a sequence, the output carries the cache under the installed version's
    field, and two different caches are refused."""
    from ttr.hf.model import CACHE_FIELD

    model = make(HYBRID)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        for name in ("cache", "past_key_values"):
            out = model(ids[:, :5])
            cache = getattr(out, CACHE_FIELD)
            assert isinstance(cache, TTRCache)
            more = model(ids[:, 5:], **{name: cache}).logits
            assert_close(torch.cat([out.logits, more], 1), full, tol=1e-8, what=name)
        with pytest.raises(ValueError, match="two different"):
            model(ids[:, :1], cache=TTRCache(), past_key_values=TTRCache())


def test_continuation_chunk_equals_full_forward():
    model = make(HYBRID)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4])
        more = model(ids[:, 4:], past_key_values=out.past_key_values).logits
    assert_close(torch.cat([out.logits, more], dim=1), full, tol=1e-8, what="two chunks")


@pytest.mark.parametrize("pattern", PATTERNS, ids=["hybrid", "mesa"])
def test_left_padded_batch_equals_each_alone(pattern):
    model = make(pattern)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 32, (n,), generator=g) for n in (6, 3, 6, 4)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, T:], alone[0, len(p):]), f"prompt {i}"
        # the logits of real tokens do not see the pads
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        for i, p in enumerate(prompts):
            alone = model(p[None], use_cache=False).logits[0]
            assert_close(padded[i, T - len(p):], alone, tol=1e-8, what=f"prompt {i}")


def test_padding_after_prefill_is_an_error():
    model = make(HYBRID)
    ids = torch.randint(0, 32, (2, 4))
    cache = model(ids).past_key_values
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :1], attention_mask=mask, past_key_values=cache)


def test_beam_search_reorders_the_cache():
    model = make(HYBRID)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False,
                             num_return_sequences=2)
    assert out.shape == (4, 9)


def test_labels_give_shifted_cross_entropy():
    model = make(["mesa"])
    ids = torch.randint(0, 32, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 32),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    model = make(HYBRID, dtype=torch.float32, tie_embeddings=tie)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TTRForCausalLM)
    assert (loaded.lm.head.weight is loaded.lm.embed.weight) == tie
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    backbone = AutoModel.from_pretrained(tmp_path)  # the same checkpoint, no readout use
    assert isinstance(backbone, TTRModel)
    with torch.no_grad():
        h = backbone(ids).last_hidden_state  # [B, T, d_model]
        assert torch.allclose(model.lm.head(h), model(ids).logits, atol=1e-6)


def test_auto_classes_from_config():
    cfg = AutoConfig.for_model("ttr", vocab_size=32, d_model=16, n_layers=2, n_heads=2,
                               pattern="mesa")
    assert isinstance(cfg, TTRConfig) and cfg.pattern == ["mesa"]
    assert isinstance(AutoModelForCausalLM.from_config(cfg), TTRForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), TTRModel)
    assert TTRConfig.from_dict(cfg.to_dict()).to_lm_config() == cfg.to_lm_config()


def test_backbone_decodes_like_its_forward():
    torch.manual_seed(0)
    cfg = TTRConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, pattern=HYBRID)
    model = TTRModel(cfg).double().eval()
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        full = model(ids).last_hidden_state
        out = model(ids[:, :5])
        last = model(ids[:, 5:], past_key_values=out.past_key_values).last_hidden_state
    assert_close(last, full[:, 5:], tol=1e-8, what="backbone step")


@pytest.mark.parametrize("bad, match", [
    (dict(pattern=["no_such_layer"]), "pattern"),
    (dict(d_model=0), "d_model"),
    (dict(pattern=["mesa", "mesa", "mesa"]), "pattern"),
    (dict(mixer_overrides={"no_such_option": 1}), "no_such_option"),
])
def test_bad_config_raises_a_clear_error(bad, match):
    kw = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        TTRForCausalLM(TTRConfig(**kw))


def test_wrong_cache_type_is_an_error():
    from transformers import DynamicCache

    model = make(["mesa"])
    with pytest.raises(TypeError, match="past_key_values"):
        model(torch.zeros(1, 2, dtype=torch.long), past_key_values=DynamicCache())


def test_bench_generation_runs():
    model = make(HYBRID, dtype=torch.float32)
    r = bench_generation(model, prompt_len=4, new_tokens=4)
    assert r["cached_tok_s"] > 0 and r["recompute_tok_s"] > 0


def test_ttr_hf_is_importable_from_ttr():
    import ttr

    assert ttr.hf.TTRForCausalLM is TTRForCausalLM


def test_generate_feeds_one_token_per_step():
    model = make(HYBRID)
    seen = []
    model.lm.embed.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.generate(torch.randint(0, 32, (2, 7)), max_new_tokens=5, do_sample=False)
    assert seen == [(2, 7)] + [(2,)] * 4  # the prefill, then LM.step on the new token only


def test_cli_bench_generate_writes_a_table(tmp_path):
    from ttr.cli import main

    out = tmp_path / "gen.md"
    assert main(["bench-generate", "--pattern", "gated_deltanet,softmax_attention",
                 "--new-tokens", "3", "--prompt-len", "2", "--d-model", "16", "--n-layers",
                 "2", "--out", str(out)]) == 0
    assert "| gated_deltanet+softmax_attention |" in out.read_text()
