"""difcache recipe: sdxl (stabilityai/stable-diffusion-xl-base-1.0). DeepCache plug-in defaults (~2.6x on SDXL).

python pipelines/sdxl.py            # the real model (downloads it; a GPU is advised)
python pipelines/sdxl.py --tiny     # the same code path offline on a tiny random StableDiffusionXLPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="sdxl",
    hub_id="stabilityai/stable-diffusion-xl-base-1.0",
    pipeline="StableDiffusionXLPipeline",
    call={"prompt": "a photo of an astronaut riding a horse on mars", "num_inference_steps": 50},
    method="deepcache",
    settings={"cache_interval": 3, "cache_branch_id": 0},
    note="DeepCache plug-in defaults (~2.6x on SDXL).",
)

if __name__ == "__main__":
    run(RECIPE)
