"""Two CPU processes (torchrun, gloo, accelerate's PartialState) give the samples and metrics of one process.

The run includes a dynamic policy (TeaCache) and an odd number of batches, so the processes make unequal
numbers of denoiser calls: if the cache reduced its statistics across ranks, decisions would mix the two
processes' samples, or the run would deadlock (the timeout turns that into a failure).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difcache.eval.runs import fid_parser, run_fid

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", "random:dit", "--config", "taylorseer", "teacache:threshold=0.5", "--num-samples", "6",
        "--batch-size", "2", "--steps", "5", "--features", "random", "--device", "cpu", "--no-progress"]  # fmt: skip


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, str(ROOT / "scripts" / "eval_fid.py"), *ARGS, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout

    threads = torch.get_num_threads()
    try:
        one = run_fid(fid_parser().parse_args([*ARGS, "--out", str(tmp_path / "one")]), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "two" / "fid.json").read_text())
    assert report["meta"]["processes"] == 2 and one["meta"]["processes"] == 1

    keys = ("ideal_speedup", "fid", "fid_vs_uncached", "psnr", "ssim")
    for a, b in zip(one["rows"], report["rows"], strict=True):
        assert a["label"] == b["label"]
        for key in keys:
            assert (a[key] is None) == (b[key] is None), key
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-9), (a["label"], key)
    teacache = report["rows"][2]
    assert teacache["ideal_speedup"] > 1.2  # the dynamic policy really skipped work

    # The very same files: every sample depends only on its seed and its batch.
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "samples").glob("*/*.png"))
    assert len(files) == 3 * 6
    for rel in files:
        assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes(), rel
