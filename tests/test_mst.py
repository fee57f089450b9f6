"""MST compression: the tree is a minimum spanning tree rooted at its center, the tree-order matmul equals
the dense binary matmul exactly (integer activations), encode/decode round-trips, the regularizer counts
sign disagreements."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress import mst


def clustered(R: int = 40, K: int = 96, seed: int = 0, flips: float = 0.05) -> torch.Tensor:
    """Rows that are noisy copies of a few prototypes, so the tree has short edges."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, K, generator=g) < 0.5
    rows = protos[torch.randint(0, 4, (R,), generator=g)]
    flip = torch.rand(R, K, generator=g) < flips
    return rows ^ flip


def brute_force_mst_weight(D: torch.Tensor) -> int:
    """Kruskal over all edges (independent of Prim)."""
    R = D.shape[0]
    parent = list(range(R))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    total = 0
    for w, i, j in sorted((int(D[i, j]), i, j) for i, j in itertools.combinations(range(R), 2)):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[ri] = rj
            total += w
    return total


def test_hamming_distances_count_differing_bits() -> None:
    S = clustered()
    D = mst.hamming(S)
    assert int(D[3, 7]) == int((S[3] != S[7]).sum()) and bool((D.diagonal() == 0).all())


def test_tree_is_a_minimum_spanning_tree_rooted_at_its_center() -> None:
    S = clustered()
    tree = mst.build(S)
    D = mst.hamming(S)
    weight = sum(int(D[v, int(tree.parent[v])]) for v in range(len(S)) if tree.parent[v] >= 0)
    assert weight == brute_force_mst_weight(D)
    assert int((tree.parent < 0).sum()) == 1
    # no other root gives a shallower tree
    best = min(mst.depth(mst._reroot(tree.parent, r)) for r in range(len(S)))
    assert mst.depth(tree.parent) == best


def test_tree_order_matmul_equals_the_dense_binary_matmul_exactly() -> None:
    S = clustered()
    tree = mst.build(S)
    x = torch.randint(-1000, 1000, (S.shape[1], 3), dtype=torch.int64)
    assert torch.equal(mst.matmul(tree, S, x), (S.long() * 2 - 1) @ x)
    xf = torch.randn(S.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(mst.matmul(tree, S, xf), (S.double() * 2 - 1) @ xf)


def test_encode_decode_round_trip_and_stats_are_consistent() -> None:
    S = clustered()
    tree = mst.build(S)
    assert torch.equal(mst.decode(tree), S)
    st = mst.stats(tree)
    assert 0 < st.mean_edge_over_K < 0.2 and 0.5 < st.ops_saved < 1  # clustered rows: short edges
    assert st.ideal_bytes < st.plain_bytes < st.mst_bytes  # short rows: only ⌈log2⌉-bit indices would win
    long = mst.stats(mst.build(clustered(R=40, K=1024, flips=0.005)))
    assert long.smaller and long.ideal_bytes < long.mst_bytes  # long rows, short edges: the stored tree wins
    random_rows = torch.rand(40, 96, generator=torch.Generator().manual_seed(1)) < 0.5
    assert not mst.stats(mst.build(random_rows)).smaller  # and on random rows it does not


def test_the_stored_layout_round_trips_and_refuses_a_broken_tree() -> None:
    from compress import format as fmt

    S = clustered()
    tree = mst.build(S)
    t = fmt.pack_mst(tree.parent, tree.diffs, S.shape[1])
    assert t["mst_parent"].dtype == torch.int16 and t["mst_col"].dtype == torch.int16
    assert torch.equal(fmt.unpack_mst(t, S.shape[1]), S)
    bits = sum(v.numel() * v.element_size() * 8 for v in t.values())
    assert bits == fmt.mst_bits(*S.shape, len(t["mst_col"])) and mst.stats(tree).mst_bytes == -(-bits // 8)
    cyc = dict(t, mst_parent=torch.roll(torch.arange(len(S)), 1).to(torch.int16))  # a cycle, no root
    with pytest.raises(ValueError, match="exactly one root"):
        fmt.unpack_mst(cyc, S.shape[1])


def test_regularizer_counts_sign_disagreements_along_edges() -> None:
    S = clustered()
    tree = mst.build(S)
    W = (S.float() * 2 - 1).requires_grad_(True)
    reg = mst.regularizer(W, tree.parent, beta=50.0)
    assert float(reg.detach()) == float(tree.edge_distances().sum())
    reg.backward()
    assert W.grad is not None and torch.isfinite(W.grad).all()
