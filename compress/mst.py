"""MST compression of binary rows (Vo et al., ICCV 2023, "MST-compression"), for LLM sign matrices.

A binary matrix S ∈ {±1}^{R×K} (the sign plane of a binarized Linear, rows = output channels). If row c
differs from row p exactly on the columns D (|D| = d, their Hamming distance), then

    s_c · x = s_p · x − 2 · Σ_{k ∈ D} s_pk x_k

so along a spanning tree every row but the root costs d additions instead of K. The minimum spanning
tree of the Hamming graph minimises the total work Σ d; rooting it at its center minimises the depth
(the longest chain of dependent rows). No reference code exists (methods-binprune.md §4): this follows
the paper's abstract and our derivation, with real-valued activations (the LLM case), where the per-row
scales apply after the tree: y = α ⊙ (S x) + μ ⊙ Σ x.

Storage (format.py, `LayerSpec.signs = "mst"`): a parent index per row (int16), row offsets (int32) and
every differing column (int16), the root as its + columns. It beats the plain K sign bits per row only
when the mean edge is below about (K − 48) / 16 columns (33 of K = 576, 5.7%); `stats` reports the stored
bytes and the ideal ones (⌈log2 R⌉ bits per parent, ⌈log2 K⌉ per column), PB-LLM's rounding stores the
tree only when it is smaller, and `decode` inverts it exactly.

`regularizer` is the training-time term that pulls tree neighbours' latent weights to the same sign
(a smooth Hamming distance on tanh(β·w)); the distillation stage can add it to its loss.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


def hamming(S: Tensor) -> Tensor:
    """Pairwise Hamming distances [R, R] (int64) of the rows of a bool sign matrix S [R, K] (True = +)."""
    P = S.double() * 2 - 1
    return ((S.shape[1] - P @ P.T) / 2).round().long()


def minimum_spanning_tree(D: Tensor) -> Tensor:
    """Prim on a dense distance matrix [R, R]: parent [R] (int64) of each row, -1 for row 0 (the start)."""
    R = D.shape[0]
    inf = torch.iinfo(torch.int64).max
    best = D[0].clone()
    parent = torch.zeros(R, dtype=torch.int64)
    done = torch.zeros(R, dtype=torch.bool)
    done[0] = True
    best[0] = inf
    parent[0] = -1
    for _ in range(R - 1):
        v = int(torch.argmin(best.masked_fill(done, inf)))
        done[v] = True
        closer = (D[v] < best) & ~done
        best = torch.where(closer, D[v], best)
        parent = torch.where(closer, torch.tensor(v), parent)
        best[v] = inf
    return parent


def _adjacency(parent: Tensor) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(len(parent))]
    for c, p in enumerate(parent.tolist()):
        if p >= 0:
            adj[c].append(p)
            adj[p].append(c)
    return adj


def _bfs(adj: list[list[int]], root: int) -> tuple[list[int], list[int]]:
    """(order, parent) of a BFS from root."""
    par = [-2] * len(adj)
    par[root] = -1
    order, q = [], deque([root])
    while q:
        v = q.popleft()
        order.append(v)
        for u in adj[v]:
            if par[u] == -2:
                par[u] = v
                q.append(u)
    return order, par


def _reroot(parent: Tensor, root: int) -> Tensor:
    """The same tree rooted at `root`."""
    _, par = _bfs(_adjacency(parent), root)
    return torch.tensor(par, dtype=torch.int64)


def reroot_at_center(parent: Tensor) -> Tensor:
    """The same tree rooted at its center (the node of least eccentricity), which minimises the depth."""
    adj = _adjacency(parent)
    order, _ = _bfs(adj, 0)
    far = order[-1]  # one end of a longest path
    order, par = _bfs(adj, far)
    path = [order[-1]]  # the other end, walked back to `far`
    while par[path[-1]] >= 0:
        path.append(par[path[-1]])
    return _reroot(parent, path[len(path) // 2])


def depth(parent: Tensor) -> int:
    """Height of the rooted tree (edges on the longest root-to-leaf chain)."""
    d = [0] * len(parent)
    order, _ = _bfs(_adjacency(parent), int((parent < 0).nonzero()[0]))
    par = parent.tolist()
    for v in order:
        if par[v] >= 0:
            d[v] = d[par[v]] + 1
    return max(d)


@dataclass
class Tree:
    """A rooted spanning tree over the rows of a sign matrix and its per-edge differences."""

    parent: Tensor  # int64 [R], -1 at the root
    order: Tensor  # int64 [R], a topological (BFS) order from the root
    diffs: list[Tensor]  # per row, int64 positions where it differs from its parent (root: all its + bits)
    K: int

    @property
    def root(self) -> int:
        return int(self.order[0])

    def edge_distances(self) -> Tensor:
        return torch.tensor([len(self.diffs[v]) for v in self.order[1:].tolist()], dtype=torch.float64)


def build(S: Tensor) -> Tree:
    """MST over the rows of S [R, K] (bool, True = +), rooted at its center."""
    parent = reroot_at_center(minimum_spanning_tree(hamming(S)))
    root = int((parent < 0).nonzero()[0])
    order, _ = _bfs(_adjacency(parent), root)
    diffs = []
    for v in range(S.shape[0]):
        p = int(parent[v])
        diffs.append(torch.nonzero(S[v]).flatten() if p < 0 else torch.nonzero(S[v] != S[p]).flatten())
    return Tree(parent, torch.tensor(order), diffs, S.shape[1])


def matmul(tree: Tree, S: Tensor, x: Tensor) -> Tensor:
    """S± x for S [R, K] and x [K, M], evaluated in tree order: the root densely, every other row from its
    parent with only its differing columns. Exactly equal to the dense product for integer x."""
    P = S.to(x.dtype) * 2 - 1
    out = torch.empty(S.shape[0], x.shape[1], dtype=x.dtype)
    root = tree.root
    out[root] = P[root] @ x
    for v in tree.order[1:].tolist():
        p = int(tree.parent[v])
        d = tree.diffs[v]
        out[v] = out[p] - 2 * (P[p, d] @ x[d])
    return out


@dataclass
class Stats:
    rows: int
    K: int
    mean_edge_over_K: float
    ops_saved: float  # 1 − (K + Σ d) / (R K): additions saved against the dense binary product
    depth: int
    mst_bytes: int  # as stored (format.py's MST layout)
    ideal_bytes: int  # with ⌈log2 R⌉-bit parents and ⌈log2 K⌉-bit columns
    plain_bytes: int  # the 1-bit sign plane (K padded to 32)

    @property
    def smaller(self) -> bool:
        return self.mst_bytes < self.plain_bytes


def stats(tree: Tree) -> Stats:
    from compress import format as fmt

    R, K = len(tree.parent), tree.K
    d = tree.edge_distances()
    edges = int(d.sum()) + len(tree.diffs[tree.root])
    ideal = K + (R - 1) * math.ceil(math.log2(max(R, 2))) + int(d.sum()) * math.ceil(math.log2(max(K, 2)))
    return Stats(R, K, float(d.mean() / K) if len(d) else 0.0, 1 - (K + float(d.sum())) / (R * K),
                 depth(tree.parent), math.ceil(fmt.mst_bits(R, K, edges) / 8), math.ceil(ideal / 8),
                 R * fmt.packed_words(K, 1) * 4)


def decode(tree: Tree) -> Tensor:
    """The sign matrix [R, K] (bool) back from the root's bits and the per-edge differences."""
    R = len(tree.parent)
    S = torch.zeros(R, tree.K, dtype=torch.bool)
    S[tree.root, tree.diffs[tree.root]] = True
    for v in tree.order[1:].tolist():
        S[v] = S[int(tree.parent[v])]
        S[v, tree.diffs[v]] = ~S[v, tree.diffs[v]]
    return S


def regularizer(W: Tensor, parent: Tensor, beta: float = 10.0) -> Tensor:
    """Smooth total MST distance of latent weights W [R, K] along the tree: Σ_edges Σ_k (1 − t_c t_p) / 2
    with t = tanh(β w), which counts the sign disagreements as β → ∞. Differentiable in W."""
    child = torch.nonzero(parent >= 0).flatten()
    t = torch.tanh(beta * W)
    return ((1 - t[child] * t[parent[child]]) / 2).sum()
