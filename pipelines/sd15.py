"""difcache recipe: sd15 (stable-diffusion-v1-5/stable-diffusion-v1-5). DeepCache plug-in defaults (~2.3x on SD1.5).

python pipelines/sd15.py            # the real model (downloads it; a GPU is advised)
python pipelines/sd15.py --tiny     # the same code path offline on a tiny random StableDiffusionPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="sd15",
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    pipeline="StableDiffusionPipeline",
    call={"prompt": "a photo of an astronaut riding a horse on mars", "num_inference_steps": 50},
    method="deepcache",
    settings={"cache_interval": 3, "cache_branch_id": 0},
    note="DeepCache plug-in defaults (~2.3x on SD1.5).",
)

if __name__ == "__main__":
    run(RECIPE)
