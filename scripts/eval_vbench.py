"""Videos for a VBench prompt file per cache setting, in the layout VBench expects, plus offline fidelity metrics.

    python scripts/eval_vbench.py --model video --method taylorseer --config fora:interval=2 --out runs/vb-video
    python scripts/eval_vbench.py --model pipeline:/models/Wan2.1-T2V-1.3B-Diffusers \
        --prompts VBench/prompts/all_dimension.txt --method taylorseer --steps 50 --out runs/vb-wan
    accelerate launch --num_processes 8 scripts/eval_vbench.py ...        # 8 GPUs split the videos

Videos go to OUT/vbench/<setting>/<prompt>-<i>.mp4 (or .gif without PyAV). Offline, the report (OUT/vbench.json,
OUT/vbench.md) has PSNR/SSIM per frame against the uncached videos and the temporal-flickering formula, labelled
as not VBench; OUT/vbench/commands.sh holds the `vbench evaluate` commands to run in VBench's own environment,
or pass --run-vbench where vbench imports. See docs/evaluation.md.
"""

import sys

from difcache.eval.vbench import main

if __name__ == "__main__":
    sys.exit(main())
