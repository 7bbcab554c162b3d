"""difcache recipe: ltx (Lightricks/LTX-Video). No official TaylorSeer setting for LTX; N=4 is our conservative choice.

python pipelines/ltx.py            # the real model (downloads it; a GPU is advised)
python pipelines/ltx.py --tiny     # the same code path offline on a tiny random LTXPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="ltx",
    hub_id="Lightricks/LTX-Video",
    pipeline="LTXPipeline",
    call={
        "prompt": "A woman with long brown hair walks on a beach",
        "num_inference_steps": 50,
        "width": 704,
        "height": 480,
        "num_frames": 121,
    },
    method="taylorseer",
    settings={"interval": 4, "order": 1, "warmup": 3},
    note="No official TaylorSeer setting for LTX; N=4 is our conservative choice.",
)

if __name__ == "__main__":
    run(RECIPE)
