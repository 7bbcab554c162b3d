"""Metric functions against values known from their definitions (no downloaded weights)."""

import json
import math
import string

import pytest
import torch

from difcache.errors import DifcacheError
from difcache.eval.features import inception_status, random_extractor, resolve_extractor
from difcache.eval.metrics import (
    FIDAccumulator,
    fid_from_features,
    psnr,
    psnr_per_image,
    ssim,
    ssim_per_image,
    temporal_flickering,
)


def test_psnr_known_values_per_image():
    a = torch.zeros(2, 3, 16, 16)
    b = torch.stack([torch.full((3, 16, 16), 0.1), torch.full((3, 16, 16), 0.01)])
    assert psnr_per_image(a, b).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)  # 10 log10(1 / MSE)
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-4)
    assert math.isinf(psnr(b, b))
    # uint8 input means /255: one level everywhere is MSE (1/255)^2
    assert psnr(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.ones(1, 3, 8, 8, dtype=torch.uint8)) == pytest.approx(
        20 * math.log10(255), abs=1e-3
    )


def test_ssim_known_values():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    # Constant images: contrast/structure terms are C2/C2 = 1, so SSIM is the luminance term alone.
    c1 = (0.01 * 1.0) ** 2
    mu_x, mu_y = 0.5, 0.25
    expected = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    assert ssim(torch.full((1, 3, 16, 16), mu_x), torch.full((1, 3, 16, 16), mu_y)) == pytest.approx(expected, abs=1e-5)
    # Tiny images get a smaller window instead of failing; noise lowers SSIM.
    small = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noisy = (small + 0.2 * torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert 0.0 < ssim(small, noisy) < 0.99
    # Videos [B, F, C, H, W] are scored per frame.
    assert ssim_per_image(torch.rand(2, 4, 3, 16, 16), torch.rand(2, 4, 3, 16, 16)).shape == (8,)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(DifcacheError, match="same seeds"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 16, 16))


def test_temporal_flickering_known_values():
    static = torch.rand(1, 1, 3, 8, 8).expand(2, 5, 3, 8, 8).clone()
    assert temporal_flickering(static).tolist() == pytest.approx([1.0, 1.0])
    alternating = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)] * 2).unsqueeze(0)
    assert temporal_flickering(alternating).item() == pytest.approx(0.0)
    ramp = torch.stack([torch.full((3, 4, 4), 10 * k, dtype=torch.uint8) for k in range(4)])  # +10 levels a frame
    assert temporal_flickering(ramp).item() == pytest.approx((255 - 10) / 255)
    with pytest.raises(DifcacheError):
        temporal_flickering(torch.rand(2, 1, 3, 8, 8))


def test_fid_known_gaussian_identities():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    # Same covariance, shifted mean: FID = |shift|^2.
    assert fid_from_features([real[:200], real[200:]], [real + shift]) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Scaled about the mean by 2: covariance 4Σ, sqrt(Σ·4Σ) = 2Σ, so FID = tr(Σ + 4Σ - 4Σ) = tr(Σ).
    mean = real.mean(0)
    trace = float(torch.cov(real.T).trace())
    assert fid_from_features([real], [2 * (real - mean) + mean]) == pytest.approx(trace, rel=1e-6)


def test_fid_accumulator_keeps_real_statistics_across_resets():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 1.0
    acc = FIDAccumulator(4)
    acc.add_real(real)
    acc.add_fake(fake)
    first = acc.compute()
    acc.reset()
    assert acc.num_real == 300
    acc.add_fake(real)
    assert acc.compute() == pytest.approx(0.0, abs=1e-6)
    acc.reset()
    acc.add_fake(fake)
    assert acc.compute() == pytest.approx(first, rel=1e-9)
    with pytest.raises(DifcacheError, match="at least 2"):
        acc.reset()
        acc.compute()


def test_random_extractor_is_seeded_labelled_and_resizes():
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    a, b = random_extractor(seed=0), random_extractor(seed=0)
    assert torch.equal(a(images), b(images))
    assert a(images).shape == (3, a.num_features)
    assert "RANDOM" in a.description and a.name == "random"
    assert resolve_extractor("none") is None
    with pytest.raises(DifcacheError, match="Unknown --features"):
        resolve_extractor("clip")


def test_missing_inception_is_reported_with_the_fix():
    ok, why = inception_status()
    if ok:
        pytest.skip("Inception weights and torch-fidelity are present here")
    with pytest.raises(DifcacheError, match="Inception FID is unavailable"):
        resolve_extractor("inception")
    assert "pip install" in why or "weights" in why
    # An explicit weights path that does not exist names that path.
    assert "/nope/w.pth" in inception_status("/nope/w.pth")[1] or "torch-fidelity" in inception_status("/nope")[1]


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, **special)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return model, CLIPProcessor.from_pretrained(folder)


def test_clip_score_matches_its_definition(tmp_path):
    from difcache.eval.clip import ClipScorer

    model, processor = _tiny_clip(tmp_path)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square", "two crosses", "a triangle"]
    scorer = ClipScorer(tmp_path)
    scorer.update(images[:2], texts[:2])
    scorer.update(images[2:], texts[2:])
    with torch.no_grad():
        pixels = processor(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cosine = torch.nn.functional.cosine_similarity(img, txt).mean().item()
    assert scorer.compute() == pytest.approx(max(100 * cosine, 0.0), abs=1e-3)
    with pytest.raises(DifcacheError, match="config.json"):
        ClipScorer(tmp_path / "missing")


def test_peak_call_memory_counts_live_bytes_views_included():
    from difcache.bench.memory import peak_call_memory

    mib = 1 << 18  # float32 elements in 1 MiB

    def call():
        a = torch.ones(mib)
        view = a.view(-1)
        del a  # the base tensor dies, its storage lives on through the view: still 1 MiB
        b = view * 2
        return b + 1  # 3 MiB at the peak (2 MiB if the view's storage were wrongly dropped)

    assert peak_call_memory(call) == 3 * (1 << 20)

    def chain():
        x = torch.ones(mib)
        for _ in range(10):
            x = x * 2  # one buffer replaces another: the peak stays at 2 MiB

    assert peak_call_memory(chain) == 2 * (1 << 20)


def test_paired_speedups_pair_each_variant_with_the_reference_run_just_before_it():
    """A fake clock: the machine slows down linearly over time; each call costs its work times the slowdown."""
    from difcache.bench.timing import paired_speedups

    now = [0.0]
    order = []

    def call(name, work):
        def run():
            order.append(name)
            now[0] += work * (1.0 + now[0] / 100.0)  # drift: later calls are slower (~20 % over the run)

        return run

    variants = {"ref": call("ref", 1.0), "fast": call("fast", 0.5), "slow": call("slow", 2.0)}
    medians, speedups = paired_speedups(variants, "ref", repeats=3, warmup=1, clock=lambda: now[0])
    assert order[:4] == ["ref", "fast", "ref", "slow"] and len(order) == 16
    # Within a pair the drift is small, so ratios stay near the true 2x and 0.5x.
    assert abs(speedups["fast"] - 2.0) < 0.1 and abs(speedups["slow"] - 0.5) < 0.05
    assert set(medians) == {"ref", "fast", "slow"} and "ref" not in speedups
