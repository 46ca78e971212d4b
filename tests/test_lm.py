"""ttr.nn.lm: the causal LM built from catalogue entries (hybrids by a per-layer pattern)."""

import pytest
import torch

from ttr.nn.lm import LM, LMConfig
from ttr.testing import assert_close

F64 = torch.float64
HYBRID = ("gated_deltanet",) * 3 + ("softmax_attention",)


@pytest.mark.parametrize("pattern", [HYBRID, ("mesa",), ("ttt_linear",), ("local_linear",)])
def test_decoding_and_split_equal_the_full_forward(pattern):
    torch.manual_seed(0)
    model = LM(LMConfig(vocab_size=40, d_model=16, n_layers=len(pattern) if len(pattern) > 1
                        else 2, n_heads=2, pattern=pattern)).to(F64)
    ids = torch.randint(0, 40, (2, 19))
    full, _ = model(ids)
    states, steps = model.init_states(2), []
    for t in range(ids.shape[1]):
        logits, states = model.step(ids[:, t], states)
        steps.append(logits)
    assert_close(torch.stack(steps, 1), full, dtype=F64, what="step vs forward")
    a, s = model(ids[:, :7], output_states=True)
    b, _ = model(ids[:, 7:], s)
    assert_close(torch.cat([a, b], 1), full, dtype=F64, what="split vs forward")


def test_config_validation_and_tied_embeddings():
    with pytest.raises(ValueError, match="LMConfig.pattern"):
        LMConfig(vocab_size=8, d_model=8, n_layers=3, pattern=("deltanet", "mesa"))
    with pytest.raises(ValueError, match="not a catalogue entry"):
        LMConfig(vocab_size=8, d_model=8, n_layers=1, pattern="gpt")
    with pytest.raises(ValueError, match="unknown keys"):
        LMConfig.from_dict({"vocab_size": 8, "d_model": 8, "n_layers": 1, "dropout": 0.1})
    model = LM(LMConfig(vocab_size=8, d_model=8, n_layers=1, pattern="deltanet"))
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="ids"):
        model(torch.zeros(2, 3))
