"""difcache recipe: dit (facebook/DiT-XL-2-256). TaylorSeer's DiT setting: N=4, O=4, 2 warm-up steps.

python pipelines/dit.py            # the real model (downloads it; a GPU is advised)
python pipelines/dit.py --tiny     # the same code path offline on a tiny random DiTPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="dit",
    hub_id="facebook/DiT-XL-2-256",
    pipeline="DiTPipeline",
    call={"class_labels": [207, 360, 387, 974], "num_inference_steps": 50},
    method="taylorseer",
    settings={},
    note="TaylorSeer's DiT setting: N=4, O=4, 2 warm-up steps.",
)

if __name__ == "__main__":
    run(RECIPE)
