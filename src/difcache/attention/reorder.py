"""Reordering video tokens from (t, h, w) raster order into 3D tiles, and back, exactly.

Video DiTs flatten latent patches frame by frame, row by row. A run of 128 consecutive tokens in that order
is a thin strip of one frame, so a block of them mixes far-apart content. Grouping tokens into small 3D
tiles (e.g. 2 x 8 x 8 = 128 tokens) first makes every attention block a compact space-time neighbourhood,
whose pooled query/key summarises it well and whose attention pattern is block-local (the tiling of STA,
Zhang et al., arXiv:2502.04507, and of PSA's ``[2, 8, 8]`` tiles; Kandinsky 5's NABLA uses 1 x 8 x 8).

Grids that the tile does not divide keep smaller tiles at their far edges: the permutation is a bijection
of the same N tokens (no padding tokens enter the model), so ``from_tiles(to_tiles(x))`` is ``x`` bit for bit.
"""

from __future__ import annotations

import functools

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
