"""Train the bundled models on procedurally generated shapes (seeded, CPU; one thread unless ``--threads``).

    python scripts/train_bundled.py dit --steps 6000          # class-conditional pixel DiT, rectified flow
    python scripts/train_bundled.py unet --steps 6000         # UNet2DModel, DDPM epsilon objective, DDIM sampling
    python scripts/train_bundled.py classifier --steps 1500   # CNN on the same shapes: features for offline FID
    python scripts/train_bundled.py video --image-steps 8000 --steps 2000 --batch 16 --threads 2
                                        # tiny Wan video DiT: 2-frame clips first, then 8-frame clips (~36 min)

Writes ``src/difcache/models/weights/<name>.safetensors`` and ``<name>.json`` (model config and training
facts), and under ``docs/models/``: a loss curve (CSV) and sample grids, the last one ``<name>_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from difcache.models import bundled
from difcache.models.shapes import CLASSES, clip_frames, make_clips, make_images, to_uint8_grid

ROOT = Path(__file__).resolve().parents[1]
RESUME = False  # set by --resume: continue from the saved weights with a fresh learning-rate schedule
PREVIOUS: list[dict] = []
WEIGHTS = ROOT / "src" / "difcache" / "models" / "weights"
DOCS = ROOT / "docs" / "models"


def _batches(data: torch.Tensor, labels: torch.Tensor, batch: int, gen: torch.Generator):
    while True:
        index = torch.randint(len(data), (batch,), generator=gen)
        x = data[index]
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
        yield x, labels[index]


def _save(name: str, model: torch.nn.Module, extra: dict, tensors: dict | None = None) -> None:
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state.update(tensors or {})
    save_file(state, WEIGHTS / f"{name}.safetensors")
    config = dict(model.config) if hasattr(model, "config") else {}
    (WEIGHTS / f"{name}.json").write_text(json.dumps({"config": _jsonable(config), **extra}, indent=1))


def _resume(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """With ``--resume``: load the saved weights into ``model``; returns the extra tensors saved beside them."""
    if not RESUME or not (WEIGHTS / f"{name}.safetensors").exists():
        return {}
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(WEIGHTS / f"{name}.safetensors").items()}
    extra = {k: state.pop(k) for k in [k for k in state if k not in model.state_dict()]}
    model.load_state_dict(state)
    previous = json.loads((WEIGHTS / f"{name}.json").read_text())["training"]
    print(f"[{name}] resuming from the saved weights ({previous['steps']} steps)", flush=True)
    return extra


def _jsonable(config: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def _train(
    name: str, model: torch.nn.Module, loss_fn, batches, steps: int, lr: float, sample_fn, every: int, checkpoint=None
) -> dict:
    """AdamW with warm-up and linear decay, EMA weights; every ``every`` steps: samples and a checkpoint
    (``checkpoint(facts)`` is called with the EMA weights loaded, so an interrupted run still leaves a model)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * (1 - s / steps)))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    DOCS.mkdir(parents=True, exist_ok=True)
    offset = sum(h.get("steps", 0) for h in PREVIOUS)  # resumed runs continue the step count and the loss curve
    resumed = offset > 0 and (DOCS / f"{name}_loss.csv").exists()
    log = open(DOCS / f"{name}_loss.csv", "a" if resumed else "w")  # noqa: SIM115 (open for the run, flushed)
    if not resumed:
        log.write("step,loss\n")
    start, running = time.time(), None
    for step in range(1, steps + 1):
        model.train()
        loss = loss_fn(model, *next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up: early samples already reflect training
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log.write(f"{offset + step},{running:.5f}\n")
            log.flush()
        if step % every == 0 or step == steps:
            print(f"[{name}] step {step}/{steps} loss {running:.4f} {time.time() - start:.0f}s", flush=True)
            if sample_fn is not None or checkpoint is not None:
                saved = {k: v.clone() for k, v in model.state_dict().items()}
                model.load_state_dict(ema)
                model.eval()
                if sample_fn is not None:
                    sample_fn(offset + step)
                if checkpoint is not None:
                    checkpoint({"steps": step, "of_planned": steps, "final_loss": running,
                                "seconds": round(time.time() - start), "lr": lr})  # fmt: skip
                model.load_state_dict(saved)
    model.load_state_dict(ema)
    model.eval()
    return {"steps": steps, "final_loss": running, "seconds": round(time.time() - start), "lr": lr}


def train_dit(steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    data, labels = make_images(24000, size=16, seed=seed)  # 16x16, patch 2: learns far faster than 32x32/p4
    model = bundled.build("dit")
    _resume("dit", model)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(m, x0, y):
        t = torch.sigmoid(torch.randn(len(x0), generator=gen))  # logit-normal times, as in SD3's rectified flow
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        return F.mse_loss(m(xt, timestep=t * 1000, class_labels=y).sample, noise - x0)

    def sample(step: int) -> None:
        pipe = bundled.dit_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            [k % len(CLASSES) for k in range(16)], num_inference_steps=30, generator=torch.Generator().manual_seed(0)
        ).images
        grid = to_uint8_grid(images, 8, upscale=2)
        grid.save(DOCS / f"dit_samples_{step:05d}.png")
        grid.save(DOCS / "dit_samples.png")

    def save(facts: dict) -> None:
        history = [*PREVIOUS, facts]
        _save("dit", model, {"training": facts, "history": history, "classes": CLASSES,
                             "objective": "rectified flow (v = noise - x0)"})  # fmt: skip

    facts = _train("dit", model, loss_fn, _batches(data, labels, 32, gen), steps, 1e-3, sample, 500, save)
    save(facts)


def train_unet(steps: int, seed: int) -> None:
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    data, labels = make_images(24000, size=16, seed=seed + 1)  # 16x16, like the DiT: learns shapes, not blobs
    model = bundled.build("unet")
    _resume("unet", model)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(m, x0, y):
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return F.mse_loss(m(noise_scheduler.add_noise(x0, noise, t), t).sample, noise)

    def sample(step: int) -> None:
        pipe = bundled.unet_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        to_uint8_grid(torch.from_numpy(images).permute(0, 3, 1, 2), 8, upscale=2).save(DOCS / "unet_samples.png")

    def save(facts: dict) -> None:
        _save("unet", model, {"training": facts, "history": [*PREVIOUS, facts],
                              "objective": "DDPM epsilon, 1000 linear-beta steps"})  # fmt: skip

    facts = _train("unet", model, loss_fn, _batches(data, labels, 32, gen), steps, 1e-3, sample, 500, save)
    save(facts)


def train_classifier(steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    data, labels = make_images(12000, seed=seed + 2)
    test, test_labels = make_images(1000, seed=seed + 3)
    model = bundled.build("classifier")
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x + 0.1 * torch.randn(x.shape, generator=gen)), y)

    facts = _train("classifier", model, loss_fn, _batches(data, labels, 64, gen), steps, 2e-3, None, 500)
    with torch.no_grad():
        accuracy = (model(test).argmax(1) == test_labels).float().mean().item()
    print(f"[classifier] held-out accuracy {accuracy:.3f}")
    _save("classifier", model, {"training": {**facts, "heldout_accuracy": accuracy}, "classes": CLASSES})


def train_video(steps: int, seed: int, image_steps: int = 0, batch: int = 32) -> None:
    """With ``image_steps``: first that many steps on two-frame clips (one latent frame, a quarter of the tokens,
    ~4× faster per step, batch 32), then ``steps`` on the 8-frame clips in batches of ``batch``. Image-then-video
    pre-training, as Wan and CogVideoX train; the shapes move little, so what the first stage learns (drawing
    them) is most of the task. Batch 16 in the second stage halves its time (~12 instead of ~25 min on 2 threads)
    for a few points of recognisable frames (model card)."""
    torch.manual_seed(seed)
    data, labels = make_clips(6000, seed=seed + 4)
    model = bundled.build("video")
    saved = _resume("video", model).get("class_embeddings")
    initial = torch.randn(len(CLASSES) + 1, 4, model.config.text_dim) * 0.5 if saved is None else saved
    embeddings = torch.nn.Parameter(initial)
    gen = torch.Generator().manual_seed(seed)
    holder = torch.nn.ModuleDict({"model": model})
    holder.register_parameter("class_embeddings", embeddings)

    def loss_fn(h, x0, y):
        y = torch.where(torch.rand(len(y), generator=gen) < 0.1, len(CLASSES), y)  # class dropout for CFG
        t = torch.rand(len(x0), generator=gen)  # uniform: logit-normal times barely train t ≈ 1 (model card)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        v = h["model"](xt, timestep=t * 1000, encoder_hidden_states=h.class_embeddings[y], return_dict=False)[0]
        return F.mse_loss(v, noise - x0)

    def sample(step: int) -> None:
        pipe = bundled.video_pipeline(model, embeddings.detach())
        pipe.set_progress_bar_config(disable=True)
        clips = pipe([0, 1, 2, 3], num_frames=frames, num_inference_steps=20,
                     generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        to_uint8_grid(clip_frames(clips), clips.shape[2], upscale=4).save(DOCS / "video_samples.png")

    def save(facts: dict) -> None:
        history = [*PREVIOUS, facts]
        _save("video", model, {"training": facts, "history": history, "classes": CLASSES},
              {"class_embeddings": embeddings.detach().half()})  # fmt: skip

    if image_steps:
        frames = 2
        images, image_labels = make_clips(24000, frames=frames, seed=seed + 5)
        stage = _train("video", holder, loss_fn, _batches(images, image_labels, 32, gen), image_steps, 1e-3, sample,
                       500, save)  # fmt: skip
        PREVIOUS.append({**stage, "frames": frames, "batch": 32})  # the 8-frame stage continues the step count
    frames = data.shape[2]
    facts = _train("video", holder, loss_fn, _batches(data, labels, batch, gen), steps, 1e-3, sample, 250, save)
    save({**facts, "frames": frames, "batch": batch})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["dit", "unet", "classifier", "video"])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue from the saved weights")
    parser.add_argument("--image-steps", type=int, default=0, help="video: first train on two-frame clips")
    parser.add_argument("--batch", type=int, default=32, help="video: batch of the 8-frame stage (card: 16)")
    args = parser.parse_args()
    global RESUME
    RESUME = args.resume
    if args.resume and (WEIGHTS / f"{args.model}.json").exists():
        saved = json.loads((WEIGHTS / f"{args.model}.json").read_text())
        PREVIOUS.extend(saved.get("history", [saved.get("training", {})]))
    torch.set_num_threads(args.threads)
    if args.model == "video":
        train_video(args.steps, args.seed, args.image_steps, args.batch)
    else:
        {"dit": train_dit, "unet": train_unet, "classifier": train_classifier}[args.model](args.steps, args.seed)


if __name__ == "__main__":
    main()
