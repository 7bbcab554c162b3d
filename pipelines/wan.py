"""difcache recipe: wan (Wan-AI/Wan2.1-T2V-1.3B-Diffusers). TaylorSeer's official Wan2.1 setting: N=5, O=1, 1 warm-
up step.

python pipelines/wan.py            # the real model (downloads it; a GPU is advised)
python pipelines/wan.py --tiny     # the same code path offline on a tiny random WanPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="wan",
    hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    pipeline="WanPipeline",
    call={
        "prompt": "A cat walks on the grass, realistic",
        "num_inference_steps": 50,
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "guidance_scale": 5.0,
    },
    method="taylorseer",
    settings={},
    note="TaylorSeer's official Wan2.1 setting: N=5, O=1, 1 warm-up step.",
)

if __name__ == "__main__":
    run(RECIPE)
