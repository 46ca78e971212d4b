"""MQAR data (paper Section 6) and the Fig. 3 experiment, at toy sizes."""

from __future__ import annotations

import csv

import pytest
import torch

from ttr.experiments.mqar import MQARConfig, MQARModel, layer_recipe, run, train
from ttr.tasks.mqar import (
    IGNORE,
    paper_mqar,
    paper_mqar_gaps,
    paper_mqar_load,
    paper_mqar_loads,
    zoology_mqar,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- paper variant ----------------------------------------------------------------------------


def test_paper_shapes_and_vocabulary():
    x, y = paper_mqar(5, 20, 6, gen())
    assert x.shape == y.shape == (5, 20) and x.dtype == y.dtype == torch.long
    assert ((x[:, 0::2] >= 0) & (x[:, 0::2] < 6)).all()  # cues 0..P-1
    assert ((x[:, 1::2] >= 6) & (x[:, 1::2] < 12)).all()  # responses P..2P-1


def test_paper_mapping_is_one_to_one_and_targets_are_repeated_cues():
    x, y = paper_mqar(50, 40, 8, gen(3))
    for seq, tgt in zip(x.tolist(), y.tolist(), strict=True):
        mapping, seen = {}, set()
        for t in range(0, 40, 2):
            u, v = seq[t], seq[t + 1]
            assert mapping.setdefault(u, v) == v  # a cue always gets the same response
            want = v if u in seen else IGNORE  # answer only cues seen before
            assert tgt[t] == want and tgt[t + 1] == IGNORE
            seen.add(u)
        assert len(set(mapping.values())) == len(mapping)  # injective


def test_paper_draws_pairs_uniformly_with_replacement():
    x, _ = paper_mqar(400, 64, 4, gen(1))
    counts = torch.bincount(x[:, 0::2].flatten(), minlength=4).double()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02
    # each sequence draws its own mapping: cue 0's response varies across sequences
    first_pair = x[x[:, 0] == 0, 1]
    assert set(first_pair.tolist()) == {4, 5, 6, 7}


def test_paper_seeding():
    a, b = paper_mqar(3, 16, 4, gen(7)), paper_mqar(3, 16, 4, gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], paper_mqar(3, 16, 4, gen(8))[0])


def test_paper_errors():
    with pytest.raises(ValueError, match="seq_len"):
        paper_mqar(2, 15, 4, gen())
    with pytest.raises(ValueError, match="num_pairs"):
        paper_mqar(2, 16, 0, gen())
    with pytest.raises(TypeError, match="generator"):
        paper_mqar(2, 16, 4, 0)


# -- zoology variant --------------------------------------------------------------------------


def test_zoology_layout():
    P, T, V = 5, 40, 32
    x, y = zoology_mqar(30, T, P, V, gen(2))
    assert x.shape == y.shape == (30, T)
    keys, values = x[:, 0:2 * P:2], x[:, 1:2 * P:2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    rows = zip(keys.tolist(), values.tolist(), x.tolist(), y.tolist(), strict=True)
    for k, v, seq, tgt in rows:
        assert len(set(k)) == P and len(set(v)) == P
        assert all(t == IGNORE for t in tgt[:2 * P])
        rest = seq[2 * P:]
        queries = [(i, tok) for i, tok in enumerate(rest, start=2 * P) if tok != 0]
        assert sorted(tok for _, tok in queries) == sorted(k)  # every key queried once
        for i, tok in queries:
            assert i % 2 == 0 and tgt[i] == v[k.index(tok)]
        assert sum(t != IGNORE for t in tgt) == P


def test_zoology_power_law_favours_short_gaps():
    def mean_query_pos(a):
        x, y = zoology_mqar(400, 64, 4, 64, gen(0), power_a=a)
        return (y != IGNORE).nonzero()[:, 1].double().mean()

    assert mean_query_pos(0.01) < mean_query_pos(1.0) - 5


def test_zoology_seeding_and_errors():
    a, b = zoology_mqar(3, 32, 4, 64, gen(5)), zoology_mqar(3, 32, 4, 64, gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seq_len"):
        zoology_mqar(2, 30, 8, 64, gen())  # 4 P > T
    with pytest.raises(ValueError, match="vocab_size"):
        zoology_mqar(2, 64, 8, 16, gen())
    with pytest.raises(ValueError, match="power_a"):
        zoology_mqar(2, 64, 8, 64, gen(), power_a=0)


# -- the experiment ---------------------------------------------------------------------------

TINY = dict(layers=("linear_attention", "rls"), num_pairs=(4,), seq_lens=(16, 32),
            train_seq_len=16, d_model=16, steps=40, batch_size=16, n_test=16, lrs=(1e-2,))


def test_training_lowers_the_loss():
    cfg = MQARConfig(**{**TINY, "steps": 150})
    torch.manual_seed(0)
    model = MQARModel(layer_recipe("linear_attention", 1.0), cfg.vocab(4), 16)
    x, y = cfg.data(64, 16, 4, gen(9))
    mask = y != IGNORE
    before = torch.nn.functional.cross_entropy(model(x, mask), y[mask]).item()
    after = train(model, cfg, 4, 16, 1e-2)
    assert after < 0.7 * before


def test_run_writes_csv_and_plot_and_is_seeded(tmp_path):
    rows = run(MQARConfig(**TINY), tmp_path / "a", progress=False)
    assert len(rows) == 2 * 2  # layers x T
    assert all(r["best"] for r in rows)  # a single lr is the best of its sweep
    with open(tmp_path / "a" / "mqar.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["variant", "layer", "num_pairs", "seq_len", "train_seq_len", "lr",
                              "accuracy", "best", "train_seconds"]
    assert (tmp_path / "a" / "mqar.png").stat().st_size > 0
    again = run(MQARConfig(**TINY), tmp_path / "b", progress=False)
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in again]


def test_config_validation():
    with pytest.raises(ValueError, match="variant"):
        MQARConfig(variant="nope")
    with pytest.raises(ValueError, match="layers"):
        MQARConfig(layers=("mamba",))
    with pytest.raises(ValueError, match="seq_lens"):
        MQARConfig(seq_lens=(127,))
    with pytest.raises(ValueError, match="seq_lens"):
        MQARConfig(variant="zoology", seq_lens=(256,))  # T < 4 P for P = 128
    with pytest.raises(ValueError, match="unknown keys"):
        MQARConfig.from_dict({"step": 3})
    with pytest.raises(ValueError, match="forms"):
        MQARConfig(forms={"rsl": "chunk"})
    for variant in ("paper", "zoology"):  # both presets satisfy their variant's constraints
        assert MQARConfig.quick(variant).train_seq_len is not None
        assert MQARConfig.full(variant).train_seq_len is None
    # narrowing a preset keeps its per-layer forms valid
    assert MQARConfig.from_dict({**vars(MQARConfig.quick()), "layers": ["linear_attention"]})


@pytest.mark.parametrize("P, T", [(4, 16), (16, 64), (128, 512)])
def test_paper_mqar_load_is_the_mean_count_of_distinct_pairs_before_an_answered_query(P, T):
    """The closed form against the generator: count, at every answered query, the distinct
    cues before it, and average."""
    inputs, targets = paper_mqar(4000, T, P, torch.Generator().manual_seed(0))
    load = paper_mqar_loads(inputs, P)[targets[:, 0::2] != IGNORE].double()
    assert paper_mqar_load(T, P) == pytest.approx(load.mean().item(), rel=5e-3)
    with pytest.raises(ValueError, match="seq_len: expected an int >= 4, got 2"):
        paper_mqar_load(2, P)


def test_paper_mqar_loads_count_the_distinct_cues_before_each_pair():
    """The module docstring's example: cues 1 0 3 0 2 1 2 0 have 0 1 2 3 3 4 4 4 distinct cues
    before them."""
    inputs, _ = paper_mqar(1, 16, 4, torch.Generator().manual_seed(4))
    assert inputs[0, 0::2].tolist() == [1, 0, 3, 0, 2, 1, 2, 0]
    assert paper_mqar_loads(inputs, 4).tolist() == [[0, 1, 2, 3, 3, 4, 4, 4]]
    # pairs since each cue's previous occurrence (0 before its first): 1 0 3 0 2 1 2 0
    assert paper_mqar_gaps(inputs, 4).tolist() == [[0, 0, 0, 2, 0, 5, 2, 4]]


def test_accuracy_by_load_splits_evaluates_count_by_the_load_of_each_query():
    """Bucket by bucket, the count of a plain scan over every answered query (the whole [n, T]
    output at once; `accuracy_by_load` scores only the cue positions, a few sequences at a
    time); the totals are `evaluate`'s. `cue_hits`, which it splits, is the scan's [n, T/2]."""
    from ttr.experiments.mqar import accuracy_by_load, cue_hits, evaluate

    torch.manual_seed(0)
    cfg = MQARConfig(**{**TINY, "num_pairs": (8,), "steps": 60})
    model = MQARModel(layer_recipe("linear_attention", 1.0), cfg.vocab(8), 16)
    train(model, cfg, 8, 32, 1e-2)
    inputs, targets = paper_mqar(40, 32, 8, gen(3))
    split = accuracy_by_load(model, inputs, targets, 8, width=3, tokens_per_batch=100)
    assert split["width"] == 3 and len(split["queries"]) == len(split["correct"]) == 3
    with torch.no_grad():
        right = model(inputs)[:, 0::2].argmax(-1) == targets[:, 0::2]  # [n, T/2]
    answered = targets[:, 0::2] != IGNORE
    hits = cue_hits(model, inputs, targets, tokens_per_batch=100)
    assert torch.equal(hits, right) and not hits[~answered].any()
    load = paper_mqar_loads(inputs, 8)
    for i in range(3):
        sel = answered & (load // 3 == i)
        assert (split["queries"][i], split["correct"][i]) == (sel.sum(), right[sel].sum())
    assert 0 < sum(split["correct"]) < sum(split["queries"])  # neither trivial nor perfect
    assert sum(split["correct"]) / sum(split["queries"]) == evaluate(model, inputs, targets)
    with pytest.raises(ValueError, match="width: expected an int >= 1, got 0"):
        accuracy_by_load(model, inputs, targets, 8, width=0)
