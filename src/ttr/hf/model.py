"""transformers wrappers around `ttr.nn.lm.LM`: a config, a backbone and a causal LM.

    >>> import ttr.hf
    >>> from transformers import AutoModelForCausalLM
    >>> cfg = ttr.hf.TTRConfig(vocab_size=256, d_model=128, n_layers=3, n_heads=4,
    ...                        pattern=["gated_deltanet", "gated_deltanet", "softmax_attention"])
    >>> model = AutoModelForCausalLM.from_config(cfg)
    >>> out = model.generate(ids, attention_mask=mask, max_new_tokens=32)   # recurrent cache
    >>> model.save_pretrained(path)                                      # model.safetensors

The blocks are the LM's own (no second implementation): `TTRModel.lm` is an `LM`, and
`TTRForCausalLM.model` is a `TTRModel`, so one checkpoint loads into both. The readout of a
backbone is kept (it is part of `LM`; tied to the embedding by default, so it costs nothing).
Generation carries a `TTRCache` (ttr.hf.cache): the per-layer MixerStates, each step feeding
only the new token. Written for transformers 5 (dataclass configs, `_tied_weights_keys` as a
{target: source} dict). transformers 5.24 renamed the cache argument and output field from
`past_key_values` to `cache` (generate() passes `cache=`; the old name still works with a
deprecation warning); forward() takes either name and the outputs use the field the installed
version has, so generation works before and after the rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ttr.hf.cache import TTRCache
from ttr.nn.lm import LM, LMConfig

# The outputs' cache field: `cache` from transformers 5.24 on, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


def _cache_arg(past_key_values, cache):
    """The cache passed under either name (see the module docstring), or None."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("cache, past_key_values: expected one cache, got two different ones")
    return cache if cache is not None else past_key_values


class TTRConfig(PretrainedConfig):
    """`LMConfig` as a transformers config (JSON in config.json): vocab_size, d_model, n_layers,
    n_heads, pattern (a list of catalogue names: one, or one per layer), mixer_overrides,
    mlp_ratio, tie_word_embeddings (alias tie_embeddings). Validated by building the LMConfig,
    so a bad field raises the LMConfig error naming it."""

    model_type = "ttr"
    attribute_map = {"tie_embeddings": "tie_word_embeddings"}

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 1
    pattern: list[str] | str | None = None  # None: ["gated_deltanet"]
    mixer_overrides: dict | None = None  # None: {}
    mlp_ratio: float = 8 / 3
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.pattern is None:
            self.pattern = ["gated_deltanet"]
        elif isinstance(self.pattern, str):
            self.pattern = [self.pattern]
        else:
            self.pattern = list(self.pattern)
        if self.mixer_overrides is None:
            self.mixer_overrides = {}
        super().__post_init__(**kwargs)
        self.to_lm_config()  # raises on a bad field

    def to_lm_config(self) -> LMConfig:
        return LMConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                        n_heads=self.n_heads, pattern=tuple(self.pattern),
                        mixer_overrides=dict(self.mixer_overrides), mlp_ratio=self.mlp_ratio,
                        tie_embeddings=self.tie_word_embeddings)


class TTRPreTrainedModel(PreTrainedModel):
    config_class = TTRConfig
    config: TTRConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted generation: a recurrent memory cannot roll back
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Nothing: `LM` initializes its own weights (gate biases set the resting decay)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() makes its own TTRCache; a DynamicCache has no place for S

    def _cached(self, run, step, input_ids, attention_mask, past_key_values, use_cache):
        """The shared pass: out [B, T, *] and the cache (None unless use_cache)."""
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError(f"input_ids: expected an integer tensor [B, T], got "
                             f"{None if input_ids is None else tuple(input_ids.shape)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, TTRCache):
            raise TypeError(f"past_key_values (cache): expected a ttr.hf.TTRCache (or None), "
                            f"got {type(past_key_values).__name__}")
        mask = None
        if attention_mask is not None:
            B, T = input_ids.shape
            if attention_mask.ndim != 2 or attention_mask.shape[0] != B or \
                    attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask: expected [B={B}, >= T={T}] (all columns "
                                 f"seen so far), got {tuple(attention_mask.shape)}")
            mask = attention_mask[:, -T:]
        cache = past_key_values if past_key_values is not None else TTRCache()
        keep = use_cache or past_key_values is not None
        out = cache.run(run, step, input_ids, mask, output_states=keep)
        return out, (cache if keep else None)


class TTRModel(TTRPreTrainedModel):
    """The backbone: input_ids [B, T] -> last_hidden_state [B, T, d_model] (after the final
    RMSNorm, what the readout reads)."""

    _tied_weights_keys = {"lm.head.weight": "lm.embed.weight"}

    def __init__(self, config: TTRConfig):
        super().__init__(config)
        self.lm = LM(config.to_lm_config())
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def _hidden(self, ids, states, output_states, step=False):
        """The LM's blocks without the readout: ids [b, T] -> (h [b, T, d_model], states)."""
        x = self.lm.embed(ids)  # [b, T, d_model]
        new = []
        for i, block in enumerate(self.lm.blocks):
            form = block.mixer.memory.step_form(block.mixer) if step else None
            x, s = block(x, None if states is None else states[i],
                         output_state=output_states or states is not None, form=form)
            new.append(s)
        return self.lm.norm(x), new

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None,
                use_cache=None, return_dict=None, cache=None, **kwargs):
        def step(ids_t, states):
            h, s = self._hidden(ids_t[:, None], states, True, step=True)
            return h[:, 0], s

        h, cache = self._cached(self._hidden, step, input_ids, attention_mask,
                                _cache_arg(past_key_values, cache), use_cache)
        out = BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()


class TTRForCausalLM(TTRPreTrainedModel, GenerationMixin):
    """input_ids [B, T] -> logits [B, T, vocab]; labels [B, T] (-100 ignored) give the shifted
    next-token cross-entropy. `generate()` decodes with a recurrent TTRCache."""

    _tied_weights_keys = {"model.lm.head.weight": "model.lm.embed.weight"}

    def __init__(self, config: TTRConfig):
        super().__init__(config)
        self.model = TTRModel(config)
        self.post_init()

    @property
    def lm(self) -> LM:
        return self.model.lm

    def get_input_embeddings(self):
        return self.lm.embed

    def set_input_embeddings(self, value):
        self.lm.embed = value

    def get_output_embeddings(self):
        return self.lm.head

    def set_output_embeddings(self, value):
        self.lm.head = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, labels=None,
                use_cache=None, return_dict=None, cache=None, **kwargs):
        """CausalLMOutputWithPast(loss, logits [B, T, V], cache: TTRCache or None; the field is
        `past_key_values` before transformers 5.24). `cache` and `past_key_values` name the
        same argument.
        With attention_mask, padded positions are dropped before the memories see them; their
        logits are zeros. Decoding (a non-empty cache, one new token) runs `LM.step`."""

        def run(ids, states, output_states):
            return self.lm(ids, states, output_states=output_states)

        logits, cache = self._cached(run, self.lm.step, input_ids, attention_mask,
                                     _cache_arg(past_key_values, cache), use_cache)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()
