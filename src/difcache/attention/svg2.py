"""Sparse VideoGen 2's semantic-aware permutation (Yang et al., "Sparse VideoGen2: Accelerate Video Generation with
Sparse Attention via Semantic-Aware Permutation", arXiv:2505.18875).

Position-based blocks mix tokens of different objects and split one object over many blocks; SVG2 instead
clusters the queries and the keys of every head by k-means on their vectors, so that a cluster holds tokens that
attend alike (queries) or are attended alike (keys), wherever they are in the video:

1. **Clustering** (:func:`kmeans`): Lloyd iterations on ``[B * H]`` independent problems at once, warm-started
   from the previous search's centroids of the same layer and CFG branch (SVG2: 2 iterations per step after
   50 at the first); the first search starts from tokens spread evenly over the sequence (SVG2 picks random
   tokens). Empty clusters keep their old centroid, as in SVG2.
2. **Permutation**: tokens sorted by cluster (stably), so each cluster is one contiguous range.
3. **Selection** (:func:`select_clusters`): the mass query cluster ``i`` puts on key cluster ``j`` is estimated by
   the centroids, ``|k_j| exp(q_i . k_j * scale)`` normalised over ``j`` (SVG2's size-weighted softmax); each
   query cluster keeps the fewest key clusters reaching ``p`` (at least ``min_kc_ratio`` of them), or, for
   comparisons at matched work, its best key clusters until they hold ``density`` of the keys.
4. **Kernel**: every query cluster attends to its key clusters' ranges: a *variable-block* kernel
   (:func:`difcache.kernels.range_sparse_attention_cpp` on CPU, which merges listed clusters that are adjacent
   in memory into one run), then the output is permuted back. No padding is computed; clusters smaller than a
   GEMM tile run below the kernel's peak rate (BENCHMARKS.md measures it against splitting clusters into blocks).

Deviation: SVG2 clusters on the GPU with cuVS / its own Triton k-means and runs a patched FlashInfer
variable-block kernel; the algorithm is the same, the kernels are difcache's. On devices other than the CPU the
``"torch"`` backend runs one gathered attention per query cluster (correct, not fast; no GPU variable-block kernel
was written, as none could be verified here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difcache.errors import DifcacheError
from difcache.kernels import cpu_extension, range_sparse_attention_cpp, range_sparse_attention_reference
from difcache.kernels._common import expand_kv_heads, listed_slots
from difcache.kernels.block_sparse_attention import masked_softmax_av


def spread_init(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """``[G, C, D]``: ``clusters`` tokens of ``x [G, N, D]`` evenly spaced along the sequence (deterministic)."""
    n = x.shape[1]
    pick = (torch.arange(clusters, device=x.device) * n) // clusters
    return x[:, pick].clone()


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[G, N]``: the nearest centroid of each token (squared Euclidean distance)."""
    dist = centroids.pow(2).sum(-1)[:, None, :] - 2 * (x @ centroids.transpose(1, 2))  # ||x||^2 is constant per row
    return dist.argmin(dim=-1)


def kmeans(
    x: torch.Tensor, clusters: int, iters: int, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x [G, N, D]`` (fp32), ``G`` problems at once: ``(labels [G, N], centroids, sizes)``.

    ``init [G, C, D]`` warm-starts (else :func:`spread_init`); ``iters`` update steps follow, each an assignment
    and a mean per cluster; the returned labels are those of the final centroids.
    """
    g, n, d = x.shape
    centroids = spread_init(x, clusters) if init is None else init.clone()
    labels = assign(x, centroids)
    for _ in range(iters):
        sums = torch.zeros(g, clusters, d, device=x.device).scatter_add_(1, labels[..., None].expand(-1, -1, d), x)
        sizes = torch.zeros(g, clusters, device=x.device).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
        centroids = torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], centroids)
        labels = assign(x, centroids)
    sizes = torch.zeros(g, clusters, dtype=torch.long, device=x.device).scatter_add_(
        1, labels, torch.ones_like(labels)
    )
    return labels, centroids, sizes


def select_clusters(
    q_centroids: torch.Tensor,
    k_centroids: torch.Tensor,
    k_sizes: torch.Tensor,
    scale: float,
    p: float | None,
    density: float | None,
    min_kc_ratio: float,
) -> torch.Tensor:
    """``[G, Cq, Ck]`` bool: the key clusters each query cluster attends to (see the module docstring, step 3)."""
    scores = (q_centroids @ k_centroids.transpose(1, 2)) * scale
    weights = k_sizes.float()[:, None, :]
    logits = scores + torch.where(weights > 0, weights.clamp_min(1).log(), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # |k_j| exp(s_ij) / sum: SVG2's size-weighted softmax
    order = probs.argsort(dim=-1, descending=True)
    ck = probs.shape[-1]
    if density is not None:
        tokens = weights.expand_as(probs).gather(-1, order)
        before = tokens.cumsum(-1) - tokens
        keep_sorted = before < density * weights.sum(-1, keepdim=True)
    else:
        mass = probs.gather(-1, order)
        keep_sorted = (mass.cumsum(-1) - mass) < p if p < 1.0 else torch.ones_like(mass, dtype=torch.bool)
    keep_sorted[..., : max(1, math.ceil(min_kc_ratio * ck))] = True
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


@dataclass(frozen=True)
class ClusterPattern:
    """An SVG2 pattern: per (batch, head) permutations of queries and keys and cluster ranges in them.

    ``q_perm``/``k_perm [B, H, N]``: the token at each permuted position; ``q_start``/``q_len [B, H, Cq]`` and
    ``k_start``/``k_len [B, H, Ck]``: cluster ranges in the permuted order; ``kv_idx [B, H, Cq, K]`` (ascending)
    and ``kv_cnt [B, H, Cq]``: the key clusters of each query cluster.
    """

    q_perm: torch.Tensor
    k_perm: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    k_start: torch.Tensor
    k_len: torch.Tensor
    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    seq_len: int
    dense: bool = False

    @classmethod
    def build(cls, q_labels: torch.Tensor, k_labels: torch.Tensor, q_sizes: torch.Tensor, k_sizes: torch.Tensor,
              keep: torch.Tensor, shape: tuple[int, int]) -> ClusterPattern:  # fmt: skip
        """From ``[G, N]`` labels, ``[G, C]`` sizes and the ``[G, Cq, Ck]`` kept cluster pairs (``G = B * H``)."""
        b, h = shape
        n = q_labels.shape[1]
        ck = keep.shape[-1]
        q_perm, k_perm = (lab.argsort(dim=-1, stable=True) for lab in (q_labels, k_labels))
        keep = keep & (k_sizes > 0)[:, None, :]  # an empty cluster is never worth listing
        cnt = keep.sum(-1)
        width = max(1, int(cnt.max()))
        ar = torch.arange(ck, device=keep.device)
        idx = torch.where(keep, ar, ck + ar).argsort(dim=-1)[..., :width]  # listed clusters first, ascending
        idx = torch.where(ar[:width] < cnt[..., None], idx, 0)
        dense = bool((keep | (k_sizes == 0)[:, None, :]).all())
        view = lambda x: x.reshape(b, h, *x.shape[1:])  # noqa: E731
        q_start, k_start = (s.cumsum(-1) - s for s in (q_sizes, k_sizes))
        return cls(view(q_perm), view(k_perm), view(q_start), view(q_sizes), view(k_start), view(k_sizes),
                   view(idx), view(cnt), n, dense)  # fmt: skip

    def work(self) -> torch.Tensor:
        """Fraction of dense attention work: listed (query token, key token) pairs over ``N^2`` (0-d tensor)."""
        listed = listed_slots(self.kv_cnt, self.kv_idx.shape[-1])
        keys = torch.where(listed, self.k_len.gather(-1, self.kv_idx.flatten(2)).view_as(self.kv_idx), 0).sum(-1)
        return ((self.q_len * keys).sum(-1).float() / self.seq_len**2).mean()

    coverage = work  # one level of detail: what is computed is what is covered

    def rows(self, which: str) -> torch.Tensor:
        """Flat row indices (over ``[B * H * N]``) for one ``index_select`` per tensor: ``"q"``, ``"k"`` permute
        into cluster order, ``"out"`` permutes the output back. Computed once per pattern (patterns are reused)."""
        key = f"_rows_{which}"
        if key not in self.__dict__:
            perm = self.q_perm if which in ("q", "out") else self.k_perm
            if which == "out":
                perm = torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device)
                                                       .expand_as(perm))  # fmt: skip
            b, h, n = perm.shape
            base = torch.arange(b * h, device=perm.device).view(b, h, 1) * n
            object.__setattr__(self, key, (perm + base).flatten())
        return self.__dict__[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Permute, attend cluster to cluster, permute back: ``(out, lse)`` for ``q, k, v [B, H, N, D]``."""
        b, h, n, d = q.shape
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)
        take = lambda x, which: x.reshape(-1, d).index_select(0, self.rows(which)).view(b, h, n, d)  # noqa: E731
        qp, kp, vp = take(q, "q"), take(k, "k"), take(v, "k")
        ranges = (self.q_start, self.q_len, self.k_start, self.k_len, self.kv_idx, self.kv_cnt)
        if backend == "cpp":
            out, lse = range_sparse_attention_cpp(qp, kp, vp, *ranges, scale)
        elif backend == "reference":
            out, lse = range_sparse_attention_reference(qp, kp, vp, *ranges, scale)
        else:
            out, lse = _per_cluster(qp, kp, vp, *ranges, scale)
        back = self.rows("out")
        return take(out, "out"), lse.reshape(-1).index_select(0, back).view(b, h, n)


def svg2_backend(backend: str, device: torch.device) -> str:
    """The backend SVG2 patterns run on: ``"cpp"`` on CPU where it builds, ``"torch"`` (per cluster) elsewhere."""
    if backend == "auto":
        return "cpp" if device.type == "cpu" and cpu_extension.load() is not None else "torch"
    if backend not in ("cpp", "torch", "reference"):
        raise DifcacheError(
            f"svg2 runs on variable-size clusters: backend 'cpp' (CPU), 'torch' or 'reference', not {backend!r}; "
            "use backend='auto'."
        )
    if backend == "cpp" and (device.type != "cpu" or cpu_extension.load() is None):
        raise DifcacheError("backend='cpp' needs CPU tensors and a C++ compiler; use backend='auto'.")
    return backend


def _per_cluster(q, k, v, q_start, q_len, k_start, k_len, kv_idx, kv_cnt, scale):
    """Any device: one gathered attention per (batch, head, query cluster). Correct; a Python loop."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, n, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), device=q.device)
    qs, ql, ks, kl, idx, cnt = (x.tolist() for x in (q_start, q_len, k_start, k_len, kv_idx, kv_cnt))
    for bi in range(b):
        for hi in range(h):
            for i, (start, length) in enumerate(zip(qs[bi][hi], ql[bi][hi], strict=True)):
                listed = idx[bi][hi][i][: cnt[bi][hi][i]]
                keys = [torch.arange(ks[bi][hi][j], ks[bi][hi][j] + kl[bi][hi][j]) for j in listed]
                if not length or not keys:
                    continue
                cols = torch.cat(keys).to(q.device)
                rows = slice(start, start + length)
                s = (q[bi, hi, rows].float() @ k[bi, hi, cols].float().T) * scale
                o, l_ = masked_softmax_av(s, v[bi, hi, cols].float(), None)
                out[bi, hi, rows], lse[bi, hi, rows] = o, l_
    return out.to(q.dtype), lse
