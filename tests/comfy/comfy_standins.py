"""Small stand-ins for the parts of ComfyUI that difcache's nodes touch (ComfyUI is not installable from PyPI).

They follow ComfyUI's calling conventions as read from its source (Comfy-Org/ComfyUI, Oct 2025): the keyed
wrapper store and ``WrapperExecutor`` (``comfy/patcher_extension.py``), ``ModelPatcher.clone`` deep-copying
``model_options`` and copying the wrapper lists while sharing the ``nn.Module`` (``comfy/model_patcher.py``),
and the guider's flow (``comfy/samplers.py``): ``sample`` clones the options and merges the patcher's wrappers
into ``transformer_options["wrappers"]``, runs the ``OUTER_SAMPLE`` wrappers around ``outer_sample``,
``inner_sample`` sets ``transformer_options["sample_sigmas"]``, and ``calc_cond_batch`` calls the model per batch
of conds with ``cond_or_uncond``, ``uuids`` and ``sigmas`` set; the diffusion model's ``forward`` runs the
``DIFFUSION_MODEL`` wrappers around ``_forward``.

The three models are tiny versions of ComfyUI's ``Flux``, ``WanModel`` and ``UNetModel`` with the same class,
block and sub-module names and the same in-place writes (FLUX blocks write into ``txt`` and ``x``). Each
compute-heavy sub-module counts its own executions in ``computed``, independently of difcache.
"""

from __future__ import annotations

import copy
import uuid

import torch
from torch import nn

OUTER_SAMPLE, DIFFUSION_MODEL = "outer_sample", "diffusion_model"
ON_PREPARE_STATE, ON_CLEANUP = "on_prepare_state", "on_cleanup"


# ---------------------------------------------------------------------------------------------- wrappers
class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def all_wrappers(wrapper_type, transformer_options):
    return [w for ws in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values() for w in ws]


def run_wrapped(wrapper_type, original, class_obj, transformer_options, *args, **kwargs):
    return WrapperExecutor(original, class_obj, all_wrappers(wrapper_type, transformer_options), 0).execute(
        *args, **kwargs
    )


def copy_nested(d):
    out = dict(d)
    for k, v in d.items():
        out[k] = copy_nested(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
    return out


# ---------------------------------------------------------------------------------------------- patcher
class ModelSamplingFlow:
    """Flow matching (ComfyUI's ModelSamplingDiscreteFlow with shift 1): sigma in [0, 1], timestep = sigma."""

    def percent_to_sigma(self, percent):
        return 1.0 if percent <= 0.0 else 0.0 if percent >= 1.0 else 1.0 - percent

    def sigmas(self, steps):
        return torch.linspace(1.0, 0.0, steps + 1)


class BaseModel(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingFlow()

    def apply_model(self, x, sigma, context, transformer_options):
        out = self.diffusion_model(x, sigma, context=context, transformer_options=transformer_options)
        return x - out * sigma.reshape(-1, *([1] * (x.dim() - 1)))  # denoised, from a velocity prediction


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers = {}
        self.callbacks = {}
        self.object_patches = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.wrappers.items()}
        n.callbacks = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.callbacks.items()}
        n.object_patches = dict(self.object_patches)
        return n

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def remove_callbacks_with_key(self, call_type, key):
        self.callbacks.get(call_type, {}).pop(key, None)

    def get_all_callbacks(self, call_type):
        return [c for cs in self.callbacks.get(call_type, {}).values() for c in cs]

    def prepare_state(self, timestep, model_options):
        """ComfyUI's ``ModelPatcher.prepare_state`` (current versions pass the sampler's ``model_options``)."""
        for callback in self.get_all_callbacks(ON_PREPARE_STATE):
            callback(self, timestep, model_options)

    def cleanup(self):
        for callback in self.get_all_callbacks(ON_CLEANUP):
            callback(self)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj


# ---------------------------------------------------------------------------------------------- sampler
class CFGGuider:
    """``batch``: "batched" runs all conds in one model call (as ComfyUI does with enough memory, uncond first),
    "split" one call per cond (low memory)."""

    def __init__(self, patcher, cond, uncond=None, cfg=3.0, batch="batched"):
        self.model_patcher, self.model_options = patcher, patcher.model_options
        self.conds = [(cond, uuid.uuid4())] + ([(uncond, uuid.uuid4())] if uncond is not None else [])
        self.cfg, self.batch = cfg, batch

    def sample(self, noise, sigmas, sampler="euler"):
        orig = self.model_options
        try:
            self.model_options = copy_nested(self.model_options)
            to = self.model_options["transformer_options"]
            for kind, keyed in self.model_patcher.wrappers.items():  # prepare_model_patcher's merge
                for key, ws in keyed.items():
                    to.setdefault("wrappers", {}).setdefault(kind, {}).setdefault(key, []).extend(ws)
            return run_wrapped(OUTER_SAMPLE, self.outer_sample, self, to, noise, None, sampler, sigmas)
        finally:
            self.model_options = orig

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, *a, **k):
        self.inner_model = self.model_patcher.model
        try:
            options = copy_nested(self.model_options)
            options["transformer_options"]["sample_sigmas"] = sigmas
            return SAMPLERS[sampler](self, noise, sigmas, options)
        finally:
            del self.inner_model
            self.model_patcher.cleanup()  # outer_sample's cleanup_models runs ON_CLEANUP inside OUTER_SAMPLE wrappers

    def predict(self, x, sigma, options):
        out = self.calc_cond_batch(x, sigma, options)
        return out[0] if len(out) == 1 else out[1] + (out[0] - out[1]) * self.cfg

    def calc_cond_batch(self, x, sigma, options):
        self.model_patcher.prepare_state(sigma, options)
        indices = list(range(len(self.conds)))[::-1]
        groups = [indices] if self.batch == "batched" else [[i] for i in indices]
        out = [None] * len(self.conds)
        for group in groups:
            to = copy_nested(options["transformer_options"])
            to.update(cond_or_uncond=list(group), uuids=[self.conds[i][1] for i in group], sigmas=sigma)
            xs, ctx = torch.cat([x] * len(group)), torch.cat([self.conds[i][0] for i in group])
            sig = torch.cat([sigma] * len(group))
            for i, chunk in zip(group, self.inner_model.apply_model(xs, sig, ctx, to).chunk(len(group)), strict=True):
                out[i] = chunk
        return out


def sample_euler(guider, x, sigmas, options):
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i] * torch.ones(x.shape[0])
        d = (x - guider.predict(x, sigma, options)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(guider, x, sigmas, options):
    for i in range(len(sigmas) - 1):
        d = (x - guider.predict(x, sigmas[i] * torch.ones(x.shape[0]), options)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - guider.predict(x2, sigmas[i + 1] * torch.ones(x.shape[0]), options)) / sigmas[i + 1]
        x = x + (d + d2) / 2 * dt
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


# ---------------------------------------------------------------------------------------------- models
class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.computed = 0


def _attention(q, k, v, heads):
    b, n, d = q.shape
    q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


def _attention_basic(q, k, v, heads, mask=None, **kwargs):
    return _attention(q, k, v, heads)


def optimized_attention(*args, **kwargs):
    """ComfyUI's attention entry point with its ``wrap_attn``: an ``optimized_attention_override`` in the
    call's ``transformer_options`` receives ``(func, *args, **kwargs)`` instead. ``[B, N, H*D]`` in and out."""
    options = kwargs.get("transformer_options")
    if "_inside_attn_wrapper" not in kwargs and options is not None and "optimized_attention_override" in options:
        return options["optimized_attention_override"](_attention_basic, *args, _inside_attn_wrapper=True, **kwargs)
    return _attention_basic(*args, **kwargs)


def _time_embedding(t, dim):
    """Sinusoids of low frequency: features change smoothly with sigma, as a trained model's do."""
    args = t.float()[:, None] * torch.linspace(0.5, 3.0, dim // 2)[None]
    return torch.cat([args.cos(), args.sin()], -1)


class DoubleStreamBlock(Counted):
    """Inline attention over txt+img (no attention sub-module), gates from ``vec``, ``txt +=`` in place."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.img_mod, self.txt_mod = nn.Linear(dim, 6 * dim), nn.Linear(dim, 6 * dim)
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_proj, self.txt_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.txt_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        for mod in (self.img_mod, self.txt_mod):  # gates near 1, so the blocks shape the output
            mod.bias.data[2 * dim : 3 * dim] += 1
            mod.bias.data[5 * dim :] += 1

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):  # noqa: B006 (ComfyUI's style)
        self.computed += 1
        im = self.img_mod(nn.functional.silu(vec))[:, None].chunk(6, -1)
        tm = self.txt_mod(nn.functional.silu(vec))[:, None].chunk(6, -1)
        iq, ik, iv = self.img_qkv(self.norm(img) * (1 + im[1]) + im[0]).chunk(3, -1)
        tq, tk, tv = self.txt_qkv(self.norm(txt) * (1 + tm[1]) + tm[0]).chunk(3, -1)
        attn = _attention(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1), self.heads)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + im[2] * self.img_proj(i_attn)
        img = img + im[5] * self.img_mlp(self.norm(img) * (1 + im[4]) + im[3])
        txt += tm[2] * self.txt_proj(t_attn)
        txt += tm[5] * self.txt_mlp(self.norm(txt) * (1 + tm[4]) + tm[3])
        return img, txt


class SingleStreamBlock(Counted):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.modulation, self.linear1 = nn.Linear(dim, 3 * dim), nn.Linear(dim, 5 * dim)
        self.linear2, self.norm = nn.Linear(3 * dim, dim), nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation.bias.data[2 * dim :] += 1

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):  # noqa: B006
        self.computed += 1
        shift, scale, gate = self.modulation(nn.functional.silu(vec))[:, None].chunk(3, -1)
        q, k, v, mlp = self.linear1(self.norm(x) * (1 + scale) + shift).split([x.shape[-1]] * 3 + [2 * x.shape[-1]], -1)
        x += gate * self.linear2(torch.cat([_attention(q, k, v, self.heads), nn.functional.gelu(mlp)], -1))
        return x


class Flux(nn.Module):
    def __init__(self, channels=4, dim=32, depth=2, depth_single=3, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.dim = dim
        self.img_in, self.txt_in, self.time_in = nn.Linear(channels, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim) for _ in range(depth_single))
        self.final_layer = nn.Linear(dim, channels)

    def forward(
        self,
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},  # noqa: B006  (ComfyUI's signature)
        **kwargs,
    ):
        args = (x, timestep, context, y, guidance, ref_latents, control, transformer_options)
        return run_wrapped(DIFFUSION_MODEL, self._forward, self, transformer_options, *args, **kwargs)

    def _forward(self, x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs):
        b, c, h, w = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))
        txt, vec = self.txt_in(context), self.time_in(_time_embedding(timestep, self.dim))
        for block in self.double_blocks:
            img, txt = block(
                img=img, txt=txt, vec=vec, pe=None, attn_mask=None, transformer_options=transformer_options
            )
            if control is not None:  # ComfyUI's ControlNet path writes into the block output
                img[:, : control.shape[1]] += control
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=None, attn_mask=None, transformer_options=transformer_options)
        return self.final_layer(img[:, txt.shape[1] :]).transpose(1, 2).reshape(b, c, h, w)


class WanSelfAttention(Counted):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, *(nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, freqs, transformer_options={}):  # noqa: B006
        self.computed += 1
        out = optimized_attention(
            self.q(x), self.k(x), self.v(x), heads=self.heads, transformer_options=transformer_options
        )
        return self.o(out)


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, transformer_options={}, **kwargs):  # noqa: B006
        self.computed += 1
        q, k, v = self.q(x), self.k(context), self.v(context)
        return self.o(optimized_attention(q, k, v, heads=self.heads, transformer_options=transformer_options))


class CountedFFN(nn.Sequential):
    def forward(self, x):
        self.computed = getattr(self, "computed", 0) + 1
        return super().forward(x)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = (
            nn.LayerNorm(dim, elementwise_affine=False),
            nn.LayerNorm(dim, elementwise_affine=False),
        )
        self.self_attn, self.cross_attn = WanSelfAttention(dim), WanT2VCrossAttention(dim)
        self.ffn = CountedFFN(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.modulation.data[:, 2::3] += 1  # gates e[2], e[5] near 1

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options={}):  # noqa: B006
        e = (self.modulation + e).chunk(6, dim=1)
        y = self.self_attn(torch.addcmul(e[0], self.norm1(x), 1 + e[1]), freqs, transformer_options=transformer_options)
        x = torch.addcmul(x, y, e[2])
        x = x + self.cross_attn(x, context, context_img_len=context_img_len, transformer_options=transformer_options)
        y = self.ffn(torch.addcmul(e[3], self.norm2(x), 1 + e[4]))
        return torch.addcmul(x, y, e[5])


class WanModel(nn.Module):
    def __init__(self, channels=4, dim=32, depth=3, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.dim, self.patch_size = dim, (1, 1, 1)
        self.patch_embedding, self.text_embedding = nn.Linear(channels, dim), nn.Linear(dim, dim)
        self.time_projection = nn.Linear(dim, 6 * dim)
        self.blocks = nn.ModuleList(WanAttentionBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        args = (x, timestep, context, clip_fea, time_dim_concat, transformer_options)
        return run_wrapped(DIFFUSION_MODEL, self._forward, self, transformer_options, *args, **kwargs)

    def _forward(self, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs):
        b, c, t, h, w = x.shape
        tokens = self.patch_embedding(x.flatten(2).transpose(1, 2))
        e0 = self.time_projection(_time_embedding(timestep, self.dim)).unflatten(1, (6, self.dim))
        context = self.text_embedding(context)
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i  # current ComfyUI sets it before each block
            tokens = block(tokens, e=e0, freqs=None, context=context, transformer_options=transformer_options)
        return self.head(tokens).transpose(1, 2).reshape(b, c, t, h, w)


class CrossAttention(Counted):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads, self.to_q, self.to_k, self.to_v = (
            heads,
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
        )
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        self.computed += 1
        context = x if context is None else context
        return self.to_out(_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class FeedForward(Counted):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        self.computed += 1
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn1, self.attn2, self.ff = CrossAttention(dim), CrossAttention(dim), FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        x = self.attn1(self.norm1(x), transformer_options=transformer_options) + x
        x = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels, depth=1):
        super().__init__()
        self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels) for _ in range(depth))

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        b, c, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context, transformer_options=transformer_options)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w)) + x


class UNetModel(nn.Module):
    """input_blocks / middle_block / output_blocks with one skip, SpatialTransformers holding the blocks."""

    def __init__(self, channels=4, dim=32, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.dim, self.time_embed = dim, nn.Linear(dim, dim)
        self.input_blocks = nn.ModuleList([nn.Conv2d(channels, dim, 3, padding=1), SpatialTransformer(dim, 2)])
        self.middle_block = SpatialTransformer(dim)
        self.output_blocks = nn.ModuleList([nn.Conv2d(2 * dim, dim, 3, padding=1), SpatialTransformer(dim)])
        self.out = nn.Conv2d(dim, channels, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        args = (x, timesteps, context, y, control, transformer_options)
        return run_wrapped(DIFFUSION_MODEL, self._forward, self, transformer_options, *args, **kwargs)

    def _forward(self, x, timesteps, context, y, control, transformer_options, **kwargs):
        h = self.input_blocks[0](x) + self.time_embed(_time_embedding(timesteps, self.dim))[:, :, None, None]
        skip = h = self.input_blocks[1](h, context=context, transformer_options=transformer_options)
        h = self.middle_block(h, context=context, transformer_options=transformer_options)
        h = self.output_blocks[0](torch.cat([h, skip], 1))
        return self.out(self.output_blocks[1](h, context=context, transformer_options=transformer_options))


MODELS = {"flux": (Flux, (1, 4, 4, 4)), "wan": (WanModel, (1, 4, 2, 2, 2)), "unet": (UNetModel, (1, 4, 4, 4))}


def make_patcher(family, seed=0):
    cls, _ = MODELS[family]
    return ModelPatcher(BaseModel(cls(seed=seed).eval()))


def computed(model):
    """Executions of every compute-counting sub-module of ``model``."""
    return sum(getattr(m, "computed", 0) for m in model.modules())


def inputs(family, seed=0, shape=None):
    """(noise, cond, uncond) for ``family``: latent shapes as ComfyUI gives them, text of 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = shape or MODELS[family][1]
    return torch.randn(*shape, generator=g), torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)


@torch.no_grad()
def sample(patcher, family, steps=10, seed=0, cfg=True, batch="batched", sampler="euler", shape=None):
    noise, cond, uncond = inputs(family, seed, shape)
    guider = CFGGuider(patcher, cond, uncond if cfg else None, batch=batch)
    return guider.sample(noise, patcher.model.model_sampling.sigmas(steps), sampler)
