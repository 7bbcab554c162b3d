"""difcache recipe: cogvideox (THUDM/CogVideoX-2b). Calibrate TeaCache coefficients first for best results:
difcache.calibrate(pipe, 'teacache', ...).

python pipelines/cogvideox.py            # the real model (downloads it; a GPU is advised)
python pipelines/cogvideox.py --tiny     # the same code path offline on a tiny random CogVideoXPipeline
"""

from _recipe import Recipe, run

RECIPE = Recipe(
    family="cogvideox",
    hub_id="THUDM/CogVideoX-2b",
    pipeline="CogVideoXPipeline",
    call={"prompt": "A panda playing guitar in a bamboo forest", "num_inference_steps": 50, "num_frames": 49},
    method="teacache",
    settings={"threshold": 0.1},
    note="Calibrate TeaCache coefficients first for best results: difcache.calibrate(pipe, 'teacache', ...).",
)

if __name__ == "__main__":
    run(RECIPE)
