"""FID, PSNR/SSIM against the uncached samples and CLIP score for several cache settings in one run.

    python scripts/eval_fid.py --model dit --method taylorseer fora --num-samples 1000 --out runs/fid-dit
    python scripts/eval_fid.py --model dit --config taylorseer:interval=3 fora:interval=2 --out runs/fid-dit
    torchrun --nproc_per_node 2 scripts/eval_fid.py --device cpu ...          # 2 CPU processes (gloo)
    accelerate launch --num_processes 8 scripts/eval_fid.py --model pipeline:/models/DiT-XL-2-256 \
        --method taylorseer --num-samples 50000 --batch-size 32 --out runs/fid-dit-xl   # 8 GPUs

Samples are saved under OUT/samples/<setting>/ and reused when the run is started again (only missing ones are
made). The report (OUT/fid.json, OUT/fid.md) names the FID feature extractor it used: Inception when
torch-fidelity and its weights are present, else the bundled shape classifier. See docs/evaluation.md.
"""

import sys

from difcache.eval.runs import main_fid

if __name__ == "__main__":
    sys.exit(main_fid())
