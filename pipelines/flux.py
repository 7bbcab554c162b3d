"""difcache recipe: flux (black-forest-labs/FLUX.1-dev). TaylorSeer's official FLUX setting: N=6, O=1, 3 warm-up
steps (~5x FLOPs).

python pipelines/flux.py            # the real model (downloads it; a GPU is advised)
python pipelines/flux.py --tiny     # the same code path offline on a tiny random FluxPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="flux",
    hub_id="black-forest-labs/FLUX.1-dev",
    pipeline="FluxPipeline",
    call={
        "prompt": "A cat holding a sign that says hello world",
        "num_inference_steps": 50,
        "guidance_scale": 3.5,
        "height": 1024,
        "width": 1024,
    },
    method="taylorseer",
    settings={},
    note="TaylorSeer's official FLUX setting: N=6, O=1, 3 warm-up steps (~5x FLOPs).",
)

if __name__ == "__main__":
    run(RECIPE)
