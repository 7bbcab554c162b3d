"""Queries, keys and values with the structure of video attention, at 8k-32k tokens, for ``bench_sparse.py quality``.

Two sources, both stated in the benchmark's output:

* :func:`synthetic_field` - a video token field built to have both kinds of structure video DiTs show: *local*
  (every token carries smooth random positional features, so neighbours in space and time look alike) and
  *semantic* (the grid is divided into ``objects`` regions that drift over time, from the argmax of smooth random
  fields; every token of a region carries the region's embedding, so far-apart tokens of one object look alike).
  Each head projects the features with its own random matrices and its own mix: some heads see mostly the
  positional part (local attention), some mostly the semantic part (attention to the same object anywhere), most
  both. A temperature sets how peaked attention is. It is not a model's attention: it is a field where
  position-based blocks and semantic clusters each capture part of the mass, so selectors can be told apart.
* :func:`captured_field` - q, k, v of the bundled video model's self-attention layers (after its RMS norms and
  rotary embedding), captured at one denoising step of a real sample and upsampled in time and space (trilinear)
  from its 4 x 8 x 8 latent grid to the benchmark's grid. Upsampling makes neighbouring tokens near copies, so
  this field is smoother than a large model's; it keeps the trained model's head patterns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _smooth(channels: int, grid: tuple[int, ...], coarse: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """``[channels, T, H, W]``: random values on a coarse grid, interpolated trilinearly (smooth fields)."""
    low = torch.randn(1, channels, *coarse, generator=g)
    return F.interpolate(low, size=grid, mode="trilinear", align_corners=False)[0]


def synthetic_field(
    grid: tuple[int, int, int],
    heads: int = 8,
    head_dim: int = 64,
    objects: int = 16,
    temperature: float = 2.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v [1, heads, T*H*W, head_dim]`` of the synthetic video token field (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n = t * h * w
    coarse = (max(2, t // 4), max(2, h // 8), max(2, w // 8))
    regions = _smooth(objects, grid, coarse, g).argmax(dim=0).flatten()  # [N]: which object each token shows
    features = 48
    semantic = torch.randn(objects, features, generator=g)[regions]  # [N, F]
    position = _smooth(features, grid, (max(2, t // 2), max(2, h // 4), max(2, w // 4)), g).flatten(1).T
    position = position / position.std()
    noise = torch.randn(n, features, generator=g)
    mix = torch.rand(heads, generator=g)  # per head: 0 = local, 1 = semantic
    qs, ks, vs = [], [], []
    for head in range(heads):
        x = mix[head] * semantic + (1 - mix[head]) * position + 0.3 * noise
        wq, wk, wv = (torch.randn(features, head_dim, generator=g) / features**0.5 for _ in range(3))
        shared = torch.randn(features, head_dim, generator=g) / features**0.5
        qs.append(x @ (wq + 2 * shared))  # q and k share a direction: tokens attend to what resembles them
        ks.append(x @ (wk + 2 * shared))
        vs.append(x @ wv)
    q, k, v = (torch.stack(xs)[None] for xs in (qs, ks, vs))
    q = q * temperature / q.std() * (head_dim**0.25)
    k = k / k.std() * (head_dim**0.25)
    return q.contiguous(), k.contiguous(), v.contiguous()


def capture_bundled(steps: int = 30, at: tuple[int, ...] = (12, 16), clips: int = 2) -> dict[int, tuple]:
    """q, k, v of every self-attention layer of the bundled video model at denoising steps ``at`` (cond branch).

    Returns ``{step: (q, k, v)}`` with ``[1, layers * heads, 256, head_dim]`` (clip 0, heads of all layers).
    """
    import difcache.models as models
    from difcache.attention import apply_sparse_attention

    pipe = models.load("video")
    pipe.set_progress_bar_config(disable=True)
    captured: dict[int, list] = {s: [] for s in at}
    handle = apply_sparse_attention(pipe, "topk", density=1.0, warmup_steps=0, dense_layers=0, block_size=16)
    runtime = handle._runtime

    def attend(layer, q, k, v, video_start, text_valid=None, scale=None):
        info = runtime.tracker.info
        if info.step in captured and info.call_in_step == 0:  # the first (cond) call of the step
            captured[info.step].append(tuple(x[:1].detach().clone() for x in (q, k, v)))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    runtime.attend = attend
    try:
        pipe(list(range(clips)), num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    return {
        step: tuple(torch.cat([layer[i] for layer in layers], dim=1) for i in range(3))
        for step, layers in captured.items()
    }


def upsample_field(x: torch.Tensor, source: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """``[1, H, N_src, D]`` tokens on the ``source`` grid -> ``[1, H, N, D]`` on ``grid`` (trilinear, per channel)."""
    _, h, _, d = x.shape
    field = x[0].transpose(1, 2).reshape(h * d, *source)[None]  # channels = heads x head dim
    up = F.interpolate(field, size=grid, mode="trilinear", align_corners=False)[0]
    return up.reshape(h, d, -1).transpose(1, 2)[None].contiguous()


def captured_field(captures: dict, step: int, grid: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """The bundled model's q, k, v at ``step`` upsampled to ``grid`` (its latent grid is 4 x 8 x 8)."""
    return tuple(upsample_field(x.float(), (4, 8, 8), grid) for x in captures[step])
