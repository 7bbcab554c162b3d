"""difcache recipe: pixart (PixArt-alpha/PixArt-XL-2-1024-MS). Δ-DiT's paper setting is PixArt-α at 20 steps.

python pipelines/pixart.py            # the real model (downloads it; a GPU is advised)
python pipelines/pixart.py --tiny     # the same code path offline on a tiny random PixArtAlphaPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="pixart",
    hub_id="PixArt-alpha/PixArt-XL-2-1024-MS",
    pipeline="PixArtAlphaPipeline",
    call={"prompt": "An astronaut riding a green horse", "num_inference_steps": 20},
    method="delta_dit",
    settings={"interval": 2},
    note="Δ-DiT's paper setting is PixArt-α at 20 steps.",
)

if __name__ == "__main__":
    run(RECIPE)
