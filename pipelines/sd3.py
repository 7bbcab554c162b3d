"""difcache recipe: sd3 (stabilityai/stable-diffusion-3.5-medium). No official TaylorSeer setting for SD3; N=4 is
our conservative choice.

python pipelines/sd3.py            # the real model (downloads it; a GPU is advised)
python pipelines/sd3.py --tiny     # the same code path offline on a tiny random StableDiffusion3Pipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="sd3",
    hub_id="stabilityai/stable-diffusion-3.5-medium",
    pipeline="StableDiffusion3Pipeline",
    call={
        "prompt": "A capybara holding a sign that reads Hello World",
        "num_inference_steps": 40,
        "guidance_scale": 4.5,
    },
    method="taylorseer",
    settings={"interval": 4, "order": 1, "warmup": 3},
    note="No official TaylorSeer setting for SD3; N=4 is our conservative choice.",
)

if __name__ == "__main__":
    run(RECIPE)
