"""Reordering video tokens from (t, h, w) raster order into 3D tiles, and back, exactly.

Video DiTs flatten latent patches frame by frame, row by row. A run of 128 consecutive tokens in that order
is a thin strip of one frame, so a block of them mixes far-apart content. Grouping tokens into small 3D
tiles (e.g. 2 x 8 x 8 = 128 tokens) first makes every attention block a compact space-time neighbourhood,
whose pooled query/key summarises it well and whose attention pattern is block-local (the tiling of STA,
Zhang et al., arXiv:2502.04507, and of PSA's ``[2, 8, 8]`` tiles; Kandinsky 5's NABLA uses 1 x 8 x 8).

Grids that the tile does not divide keep smaller tiles at their far edges (Wan 480p, grid 21 x 30 x 52, with
2 x 8 x 8 tiles: every tile row ends in a 4-wide tile). Blocking such a sequence in runs of ``block_size`` would
let blocks straddle tiles, so :func:`tile_layout` *pads*: whole tiles are packed into blocks (a tile never
split over two blocks when it fits in one; a larger tile fills whole blocks of its own), each block holding its
real tokens first and padding after, and the kernels read only the real ones (``block_len``). Where the tile
divides the grid (and its volume fits the block size) nothing is padded and the layout is the plain tile
permutation. Padding never enters the model: it exists only inside the attention call, and
``layout.scatter(layout.gather(x))`` is ``x`` bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from difcache.errors import DifcacheError


@functools.lru_cache(maxsize=64)
def tile_permutation(
    grid: tuple[int, int, int], tile: tuple[int, int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` index tensors: tiled position ``i`` holds raster token ``perm[i]``.

    Tiles are visited in (t, h, w) raster order and tokens inside a tile in (t, h, w) raster order.
    ``inverse[perm] == arange(N)``. Cached per (grid, tile, device).
    """
    if len(grid) != 3 or min(grid) < 1:
        raise DifcacheError(f"A video grid is (frames, height, width) in tokens, all >= 1; got {grid}.")
    if len(tile) != 3 or min(tile) < 1:
        raise DifcacheError(f"`tile` must be three positive ints (t, h, w), e.g. (2, 8, 8); got {tile}.")
    t, h, w = grid
    tt, th, tw = tile
    ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    # Sort key: tile coordinates first (raster over tiles), then the position inside the tile.
    tiles_h, tiles_w = -(-h // th), -(-w // tw)
    tile_id = ((ti // tt) * tiles_h + hi // th) * tiles_w + wi // tw
    inner = ((ti % tt) * th + hi % th) * tw + wi % tw
    key = tile_id * (tt * th * tw) + inner
    perm = key.flatten().argsort(stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm.to(device), inverse.to(device)


def to_tiles(x: torch.Tensor, perm: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Raster order -> tiled order along ``dim`` (``x.index_select(dim, perm)``)."""
    return x.index_select(dim, perm)


def from_tiles(x: torch.Tensor, inverse: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Tiled order -> raster order along ``dim``; the exact inverse of :func:`to_tiles`."""
    return x.index_select(dim, inverse)


def first_frame_blocks(
    grid: tuple[int, int, int], perm: torch.Tensor | None, block_size: int, n_blocks: int
) -> torch.Tensor:
    """``[n_blocks]`` bool: key blocks holding any token of frame 0 (after tiling when ``perm`` is given)."""
    frame_tokens = grid[1] * grid[2]
    n = grid[0] * frame_tokens
    device = perm.device if perm is not None else "cpu"
    raster = perm if perm is not None else torch.arange(n, device=device)
    positions = torch.nonzero(raster < frame_tokens).flatten()
    blocks = torch.zeros(n_blocks, dtype=torch.bool, device=device)
    blocks[positions // block_size] = True
    return blocks


@dataclass(frozen=True)
class TileLayout:
    """Where each video token sits in a (maybe padded) tiled sequence of ``n_padded`` positions.

    ``index [n_padded]``: the raster token at each position, ``-1`` for padding; ``inverse [N]``: the position of
    each raster token; ``block_len [M]``: real tokens per block (``None`` when nothing is padded).
    """

    index: torch.Tensor
    inverse: torch.Tensor
    block_len: torch.Tensor | None
    block_size: int

    @property
    def n_padded(self) -> int:
        return self.index.numel()

    @property
    def padded_fraction(self) -> float:
        """The share of positions that are padding (0 when the tile divides the grid)."""
        return 1.0 - self.inverse.numel() / max(self.n_padded, 1)

    def gather(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """Raster order -> this layout along ``dim``; padding positions hold zeros."""
        if self.block_len is None:
            return x.index_select(dim, self.index)
        out = x.index_select(dim, self.index.clamp(min=0))
        shape = [1] * x.dim()
        shape[dim] = -1
        return out * (self.index >= 0).view(shape).to(x.dtype)

    def scatter(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This layout -> raster order along ``dim`` (padding dropped): the exact inverse of :meth:`gather`."""
        return x.index_select(dim, self.inverse)

    def first_frame_blocks(self, frame_tokens: int) -> torch.Tensor:
        """``[M]`` bool: blocks holding any token of frame 0 (the first ``frame_tokens`` raster tokens)."""
        m = -(-self.n_padded // self.block_size)
        hits = (self.index >= 0) & (self.index < frame_tokens)
        blocks = torch.zeros(m, dtype=torch.bool, device=self.index.device)
        blocks[torch.nonzero(hits).flatten() // self.block_size] = True
        return blocks


@functools.lru_cache(maxsize=64)
def tile_layout(
    grid: tuple[int, int, int],
    tile: tuple[int, int, int] | None,
    block_size: int,
    device: torch.device | str = "cpu",
) -> TileLayout:
    """The tiled layout of ``grid`` in which no block straddles two tiles (cached per arguments).

    Tiles are visited in raster order. A tile with at most ``block_size`` tokens goes whole into the current
    block if it fits, else into a new one (the rest of the current block becomes padding); a larger tile fills
    ``ceil(size / block_size)`` blocks of its own. ``tile=None`` is raster order, unpadded.
    """
    t, h, w = grid
    n = t * h * w
    if tile is None:
        ar = torch.arange(n)
        return TileLayout(ar.to(device), ar.to(device), None, block_size)
    perm, _ = tile_permutation(grid, tile)
    tt, th, tw = tile
    sizes = [
        min(tt, t - a) * min(th, h - b) * min(tw, w - c)
        for a in range(0, t, tt)
        for b in range(0, h, th)
        for c in range(0, w, tw)
    ]  # tiles in raster order, as tile_permutation visits them
    starts, fill, pos = [], 0, 0  # the padded position where each tile begins
    for size in sizes:
        if size > block_size:  # a big tile starts a block and pads its last one
            pos += (-pos) % block_size
            starts.append(pos)
            pos += size
            pos += (-pos) % block_size
            fill = 0
            continue
        fill = pos % block_size
        if fill and fill + size > block_size:
            pos += block_size - fill
        starts.append(pos)
        pos += size
    n_padded = pos
    tile_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    first = torch.tensor(sizes).cumsum(0) - torch.tensor(sizes)
    position = torch.tensor(starts)[tile_of] + (torch.arange(n) - first[tile_of])  # padded slot of tiled token i
    index = torch.full((n_padded,), -1, dtype=torch.long)
    index[position] = perm
    inverse = torch.empty(n, dtype=torch.long)
    inverse[perm] = position
    m = -(-n_padded // block_size)
    counts = torch.zeros(m, dtype=torch.long).index_add_(0, position // block_size, torch.ones(n, dtype=torch.long))
    padded_inside = bool((index[: (m - 1) * block_size] < 0).any()) if m > 1 else False
    if not padded_inside:  # only a short last block: the kernels handle that without lengths
        index = index[:n]
        counts = None
    return TileLayout(index.to(device), inverse.to(device), None if counts is None else counts.to(device), block_size)
