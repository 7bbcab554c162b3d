"""difcache recipe: hunyuanvideo (hunyuanvideo-community/HunyuanVideo). TaylorSeer's official HunyuanVideo setting:
N=5, O=1, 1 warm-up step.

python pipelines/hunyuanvideo.py            # the real model (downloads it; a GPU is advised)
python pipelines/hunyuanvideo.py --tiny     # the same code path offline on a tiny random HunyuanVideoPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="hunyuanvideo",
    hub_id="hunyuanvideo-community/HunyuanVideo",
    pipeline="HunyuanVideoPipeline",
    call={
        "prompt": "A cat walks on the grass, realistic",
        "num_inference_steps": 50,
        "height": 320,
        "width": 512,
        "num_frames": 61,
    },
    method="taylorseer",
    settings={},
    note="TaylorSeer's official HunyuanVideo setting: N=5, O=1, 1 warm-up step.",
)

if __name__ == "__main__":
    run(RECIPE)
