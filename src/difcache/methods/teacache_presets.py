"""TeaCache's official presets per model (ali-vilab/TeaCache, snapshot 7c10efc), and which one fits a model.

Each preset is a polynomial (``np.poly1d`` order, highest degree first), the indicator it was fitted for, the
threshold and the steps always computed at the start (``warmup``) and end (``cooldown``). Thresholds are the
README's settings near 2x unless noted.
"""

from __future__ import annotations

from typing import Any

from difcache.adapters.layout import Layout

_WAN = {"indicator": "timestep_embedding", "warmup": 5, "cooldown": 0}  # use_ret_steps: e0, 5 steps, no cut-off
_COGVIDEOX = {"indicator": "timestep_embedding", "threshold": 0.2}
# Official presets (ali-vilab/TeaCache, snapshot 7c10efc): polynomial (np.poly1d order), indicator, threshold,
# forced first (warmup) and last (cooldown) steps. Thresholds are the README's ~2x settings unless noted.
PRESETS: dict[str, dict[str, Any]] = {
    "flux": {"threshold": 0.6, "coefficients": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00,
                                                2.64230861e-01)},
    "hunyuanvideo": {"threshold": 0.15, "coefficients": (7.33226126e02, -4.01131952e02, 6.75869174e01,
                                                         -3.14987800e00, 9.61237896e-02)},
    "ltx": {"threshold": 0.05, "coefficients": (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01,
                                                9.69274326e-03)},
    # 0.08: between the README's ret-steps 0.05 (1.6x) and 0.10 (2.4x) for 1.3B (ours).
    "wan2.1-t2v-1.3b": {**_WAN, "threshold": 0.08, "coefficients": (-5.21862437e04, 9.23041404e03,
                                                                    -5.28275948e02, 1.36987616e01, -4.99875664e-02)},
    "wan2.1-t2v-14b": {**_WAN, "threshold": 0.1, "coefficients": (-3.03318725e05, 4.90537029e04, -2.65530556e03,
                                                                  5.87365115e01, -3.15583525e-01)},
    "wan2.1-i2v-14b-480p": {**_WAN, "threshold": 0.2, "coefficients": (2.57151496e05, -3.54229917e04,
                                                                       1.40286849e03, -1.35890334e01, 1.32517977e-01)},
    "wan2.1-i2v-14b-720p": {**_WAN, "threshold": 0.2, "coefficients": (8.10705460e03, 2.13393892e03,
                                                                       -3.72934672e02, 1.66203073e01, -4.17769401e-02)},
    "cogvideox-2b": {**_COGVIDEOX, "coefficients": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00,
                                                    -3.61568434e-03)},
    "cogvideox-5b": {**_COGVIDEOX, "coefficients": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00,
                                                    -5.23162339e-02)},  # also CogVideoX-5b-I2V
    "cogvideox1.5-5b": {**_COGVIDEOX, "coefficients": (2.50210439e02, -1.65061612e02, 3.57804877e01,
                                                       -7.81551492e-01, 3.58559703e-02)},
    "cogvideox1.5-5b-i2v": {**_COGVIDEOX, "coefficients": (1.22842302e02, -1.04088754e02, 2.62981677e01,
                                                           -3.06009921e-01, 3.71213220e-02)},
}  # fmt: skip
FAMILY_DEFAULT = {"flux": "flux", "hunyuanvideo": "hunyuanvideo", "ltx": "ltx", "wan": "wan2.1-t2v-1.3b",
                   "cogvideox": "cogvideox-5b"}  # fmt: skip


def preset_name(layout: Layout) -> str | None:
    """Which official preset fits this model, from its family and diffusers config (``None``: none fits).

    Wan2.1: image-to-video when it has an image embedder (``image_dim``), 14B from 40 layers on; the official
    480P and 720P I2V models have the same config, so 720P is recognised only by its name (``_name_or_path``).
    CogVideoX: 1.5 when it patches time (``patch_size_t``), its I2V by ``ofs_embed_dim``; 2B by the absence of
    rotary embeddings (as the official eval code tells them apart), else 5B (whose I2V shares the coefficients).
    """
    family, config = layout.family, getattr(layout.model, "config", None)

    def get(name: str, default: Any = None) -> Any:
        value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
        return default if value is None else value

    if family == "wan":
        if get("image_dim") is not None:
            return "wan2.1-i2v-14b-720p" if "720" in str(get("_name_or_path", "")) else "wan2.1-i2v-14b-480p"
        return "wan2.1-t2v-14b" if get("num_layers", 0) >= 40 else "wan2.1-t2v-1.3b"
    if family == "cogvideox":
        if get("patch_size_t") is not None:
            return "cogvideox1.5-5b-i2v" if get("ofs_embed_dim") is not None else "cogvideox1.5-5b"
        return "cogvideox-5b" if get("use_rotary_positional_embeddings", False) else "cogvideox-2b"
    return FAMILY_DEFAULT.get(family)
