"""`ttr bench --peers`: fla's naive references are found without importing fla, loaded from their
files, and (when fla is installed) compute exactly ttr's function on the bench's inputs."""

from __future__ import annotations

import pytest
import torch

from ttr import bench, bench_peers
from ttr.bench_cases import OPS


def _fake_fla(root):
    """A package tree with one naive file whose function returns q + 1 (and a dummy state)."""
    path = root / "fla" / bench_peers.SIMPLE_GLA
    path.parent.mkdir(parents=True)
    (root / "fla" / "__init__.py").write_text("raise ImportError('needs Triton')\n")
    path.write_text("def naive_chunk_simple_gla(q, k, v, g, **kw):\n    return q + 1, None\n")
    return root / "fla"


def test_peers_load_from_their_files_without_importing_the_package(tmp_path):
    root = _fake_fla(tmp_path)
    found = bench_peers.available(root)
    assert {p.file for p in found} == {bench_peers.SIMPLE_GLA}  # the other files are missing
    peer = next(p for p in found if p.op == "linear_attention_scalar" and p.like == "chunk")
    q = torch.zeros(1, 3, 2, 4)
    fn = bench_peers.load(peer, root)  # fla/__init__.py raises: it must not run
    assert torch.equal(fn(q, q, q, q.new_zeros(1, 3, 2)), q + 1)


def test_bench_cases_add_peer_rows_only_when_asked(monkeypatch):
    fake = [p for p in bench_peers.PEERS if p.op == "delta_rule"]
    monkeypatch.setattr(bench_peers, "available", lambda root=None: fake)
    config = bench.BenchConfig(ops=("delta_rule",), Ts=(64,))
    assert all(not form.startswith("fla:") for _, form, *_ in config.cases())
    with_peers = bench.BenchConfig(ops=("delta_rule",), Ts=(64,), peers=True).cases()
    assert ("delta_rule", "fla:delta_rule_recurrence", 64, "fp32", False) in with_peers
    # a --form filter keeps the peers of the same algorithm class only
    chunk_only = bench.BenchConfig(ops=("delta_rule",), Ts=(64,), forms=("chunk",), peers=True)
    peer_forms = {form for _, form, *_ in chunk_only.cases() if form.startswith("fla:")}
    assert peer_forms == {"fla:delta_rule_chunkwise"}


def test_every_peer_names_a_bench_op_and_form():
    for p in bench_peers.PEERS:
        assert p.op in OPS and p.like in OPS[p.op].forms, p


@pytest.mark.skipif(bench_peers.fla_root() is None, reason="fla not installed")
@pytest.mark.parametrize("peer", bench_peers.PEERS, ids=lambda p: f"{p.op}-{p.function}")
def test_installed_peer_computes_ttrs_function(peer):
    if peer not in bench_peers.available():
        pytest.skip(f"{peer.file} not in this fla version")
    torch.manual_seed(0)
    op = OPS[peer.op]
    xs = op.make(1, 128, 2, 16)
    want = op.fn(*xs, form="recurrent", **op.kwargs)[0]
    got = bench_peers.load(peer)(*xs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
