"""The bundled models load offline and run; each method keeps their outputs close to uncached."""

import pytest
import torch

import difcache
from difcache.eval.metrics import psnr
from difcache.models import CLASSES, available, load
from difcache.models.shapes import clip_frames, make_images

needs = lambda name: pytest.mark.skipif(name not in available(), reason=f"bundled {name} weights missing")  # noqa: E731


@pytest.fixture(scope="module")
def dit():
    pipe = load("dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit_images(pipe, steps=20):
    return pipe([0, 1, 2, 3], num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).images


@needs("dit")
def test_dit_runs_offline_with_expected_shape(dit):
    images = _dit_images(dit, steps=3)
    size = dit.transformer.config.sample_size
    assert images.shape == (4, 3, size, size) and images.min() >= 0 and images.max() <= 1


@needs("dit")
@pytest.mark.parametrize(
    ("method", "settings", "min_psnr"),
    [
        # floors ~3 dB under what the bundled 16x16 DiT measured (33.3, 31.6, 34.9, 24.3 dB at 20 steps)
        ("fora", {"interval": 2}, 30.0),
        ("taylorseer", {"interval": 3, "order": 1, "warmup": 3}, 28.5),
        ("taylorseer", {"interval": 3, "order": 1, "warmup": 3, "lite": True}, 28.5),
        ("delta_dit", {"interval": 2}, 32.0),
        ("teacache", {"threshold": 0.3}, 21.0),
    ],
)
def test_methods_stay_close_on_the_trained_dit(dit, method, settings, min_psnr):
    reference = _dit_images(dit)
    with difcache.apply_cache(dit, method, **settings) as handle:
        cached = _dit_images(dit)
        stats = handle.stats()
    assert stats.ideal_speedup > 1.1
    assert psnr(cached, reference) > min_psnr


@needs("dit")
def test_taylorseer_lite_forecasts_the_block_stack_residual(dit):
    """TaylorSeer-Lite skips every block on a forecast step, and the stack's output there is its current input
    plus the first-order Taylor forecast of the residuals (output − input) recorded on the last two full steps."""
    blocks = dit.transformer.transformer_blocks
    inputs, outputs, block_calls = [], [], []
    hooks = [
        blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone())),
        blocks[-1].register_forward_hook(lambda m, args, out: outputs.append(out.clone())),
        blocks[0].attn1.register_forward_hook(lambda m, args, out: block_calls.append(len(inputs) - 1)),
    ]
    try:
        with difcache.apply_cache(dit, "taylorseer", interval=2, order=1, warmup=2, lite=True) as handle:
            _dit_images(dit, steps=7)
            stats = handle.stats()
    finally:
        for hook in hooks:
            hook.remove()
    full = sorted(set(block_calls))
    assert full == [0, 1, 3, 5] and stats.totals()["forecast"] == 3  # warm-up 0, 1; then every second step
    assert len(stats.units) == 1  # one unit: the whole stack
    residual = {s: outputs[s].double() - inputs[s].double() for s in full}
    for step, (prev, last) in {2: (0, 1), 4: (1, 3), 6: (3, 5)}.items():
        slope = (residual[last] - residual[prev]) / (last - prev)
        expected = inputs[step].double() + residual[last] + slope * (step - last)
        torch.testing.assert_close(outputs[step].double(), expected, rtol=0, atol=1e-4)


@needs("unet")
def test_deepcache_on_the_trained_unet():
    pipe = load("unet")
    pipe.set_progress_bar_config(disable=True)

    def run():
        out = pipe(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="np")
        return torch.from_numpy(out.images).permute(0, 3, 1, 2)

    reference = run()
    with difcache.apply_cache(pipe, "deepcache", cache_interval=2) as handle:
        cached = run()
        assert handle.stats().ideal_speedup > 1.3
    assert psnr(cached, reference) > 20.0
    assert torch.equal(run(), reference)


@needs("classifier")
def test_classifier_recognises_fresh_shapes():
    model = load("classifier")
    images, labels = make_images(200, seed=12345)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.95
    assert model.features(images[:2]).shape == (2, 128)
    assert len(CLASSES) == model.head.out_features


@needs("classifier")
def test_recognition_check_labels_rendered_clips_correctly_and_refuses_frames_without_a_shape():
    """``scripts/recognition.py`` judges samples with the still-image classifier and a size check. On rendered
    clips it must be right on every frame here (else its verdict on samples would mean nothing), wrong labels
    must count, and frames holding no shape of the data's size must be refused, which the classifier alone
    does not do: it calls plain frames circles or triangles."""
    from difcache.models.shapes import foreground_share, make_clips

    clips, labels = make_clips(16, seed=321)
    clips, reference = (clips + 1) / 2, (make_clips(200, seed=1)[0] + 1) / 2
    classifier = load("classifier")
    assert classifier.recognised_frames(clips, labels, reference=reference).all()
    assert not classifier.recognised_frames(clips, (labels + 1) % len(CLASSES), reference=reference).any()

    shares = foreground_share(clip_frames(clips))
    assert shares.min() > 0.1 and shares.max() < 0.6  # shapes of radius 0.30-0.40 of the frame
    blank = torch.rand(16, 3, generator=torch.Generator().manual_seed(0)).view(16, 3, 1, 1, 1).expand(16, 3, 8, 16, 16)
    blob = blank.clone()
    blob[..., 1:15, 1:15] = 1 - blob[..., 1:15, 1:15]  # a different colour filling all but the border
    assert foreground_share(clip_frames(blank)).eq(0).all()
    for frames in (blank, blob):
        alone = [classifier.recognised_frames(frames, torch.full((16,), k)) for k in range(len(CLASSES))]
        assert sum(a.sum() for a in alone) == 16 * 8 and any(a.any() for a in alone)  # each frame gets some class
        for k in range(len(CLASSES)):
            assert not classifier.recognised_frames(frames, torch.full((16,), k), reference=reference).any()


def test_grid_upscale_is_nearest_neighbour():
    """Sample grids upscale 16-pixel images by repeating pixels, as nearest interpolation does (same PNGs)."""
    from difcache.models.shapes import to_uint8_grid

    images = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    upscaled = torch.nn.functional.interpolate(images, scale_factor=3, mode="nearest")
    assert to_uint8_grid(images, 2, upscale=3).tobytes() == to_uint8_grid(upscaled, 2).tobytes()


def test_video_pipeline_runs_with_random_weights():
    """The pipeline code path itself (not the trained weights): sequential CFG, diffusers bookkeeping, shapes."""
    from difcache.models import bundled

    model = bundled.build("video")
    pipe = bundled.video_pipeline(model, torch.randn(len(CLASSES) + 1, 4, model.config.text_dim))
    pipe.set_progress_bar_config(disable=True)
    clips = pipe([0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert clips.shape == (2, 3, 8, 16, 16) and torch.isfinite(clips).all()


def test_video_model_sees_absolute_positions_and_the_pooled_class_in_its_modulation():
    """The bundled video model's two additions to Wan: position channels in the patch embedding (a shape at
    another place is a different input even when the content is shifted, which RoPE alone cannot tell) and the
    pooled class "text" in the time embedding, so the class reaches the adaLN modulation and not only
    cross-attention. Both must survive a save and load through the saved config."""
    from diffusers import WanTransformer3DModel

    from difcache.models import bundled

    torch.manual_seed(0)
    model = bundled.build("video").eval()
    assert isinstance(model, WanTransformer3DModel)  # difcache's Wan paths apply unchanged
    assert model.patch_embedding.weight.shape[1] == model.config.in_channels + 3

    flat = torch.zeros(1, 3, 2, 4, 4)  # a uniform clip: only the position channels differ between patches
    tokens = model.patch_embedding(flat).flatten(2)
    assert not torch.allclose(tokens[..., 0], tokens[..., -1])

    t = torch.tensor([500.0])
    text = torch.randn(2, 1, 4, model.config.text_dim)
    temb = [model.condition_embedder(t, e)[0] for e in text]
    assert not torch.allclose(temb[0], temb[1])  # the class changes the modulation, not just cross-attention

    rebuilt = bundled._with_additions("video", WanTransformer3DModel.from_config(model.config))
    rebuilt.load_state_dict(model.state_dict())  # strict: same modules, same shapes
    x, e = torch.randn(1, 3, 8, 16, 16), text[0]
    with torch.no_grad():
        a = model(x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
        b = rebuilt.eval()(x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
    assert torch.equal(a, b)


def test_missing_weights_error_names_the_training_command(tmp_path, monkeypatch):
    from difcache.models import bundled

    monkeypatch.setattr(bundled, "WEIGHTS", tmp_path)  # a checkout whose weights were never trained
    assert available() == []
    with pytest.raises(difcache.DifcacheError, match="scripts/train_bundled.py video"):
        load("video")
    with pytest.raises(difcache.DifcacheError, match="No bundled model 'nope'"):
        load("nope")


@needs("video")
def test_sparse_attention_on_the_trained_video_model():
    """Density 1 is exact; top-k 0.5 and 0.25, PSA 0.25 and top-p 0.9 stay near dense; error grows as density falls."""
    pipe = load("video")
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe([0, 2], num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images

    dense = run()
    scores = {}
    settings = {
        "full": {"method": "topk", "density": 1.0},
        "topk_half": {"method": "topk", "density": 0.5},
        "topk": {"method": "topk", "density": 0.25},
        "psa": {"method": "psa", "density": 0.25},
        "topp": {"method": "topp", "p": 0.9},
    }
    for name, setting in settings.items():
        with difcache.apply_sparse_attention(pipe, block_size=32, tile=(2, 4, 4), warmup_steps=0.2, dense_layers=0,
                                             **setting):  # fmt: skip
            out = run()
        scores[name] = psnr(clip_frames(out), clip_frames(dense))
        if name == "full":
            assert torch.allclose(out, dense, atol=1e-5)
    # floors 1.4-1.7 dB under the shipped model's 16.9 (top-k) / 21.7 (PSA) / 23.2 (top-p) dB (36-min recipe of
    # 2026-12-02; PSA read 20.2 with the pooled estimate, before PSA's own sampled estimate became its default; the
    # 50-min model of the same day read 17.4 / 20.5 / 23.3, the one before 19.0 / 20.6 / 23.7, when the top-k floor
    # was 17). PSA beats top-k on this model (and at 30 steps, BENCHMARKS.md) but did not on an earlier one: not
    # asserted, it is the model's. dense_layers=0 keeps the floors' setting (the default keeps layer 0 dense).
    assert scores["topk"] > 15.5 and scores["psa"] > 20.0 and scores["topp"] > 21.5, scores
    assert scores["topp"] > scores["topk_half"] > scores["topk"], scores  # work ~0.6 > 0.5 > 0.25
    assert torch.equal(run(), dense)  # removal restores dense attention exactly
