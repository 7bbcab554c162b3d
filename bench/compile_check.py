"""Compile both Triton kernels for an NVIDIA target without a GPU (TTIR -> TTGIR -> LLVM -> PTX -> cubin).

    python bench/compile_check.py [--arch 90]

Catches kernels that run in the interpreter but would not compile (unsupported constructs, constexpr
misuse), and prints the shared memory each configuration needs, for every dtype and head dim 64/128.
"""

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from difcache.kernels.block_sparse_attention import _bsa_fwd
from difcache.kernels.pyramid_sparse_attention import _psa_fwd

parser = argparse.ArgumentParser()
parser.add_argument("--arch", type=int, default=90)
arch = parser.parse_args().arch


def signature(fn, pointers, constants):
    out = {}
    for name in fn.arg_names:
        out[name] = (
            "constexpr" if name in constants else pointers.get(name, "fp32" if name == "qk_scale" else "i32")
        )
    return out


failures = 0
print(f"| kernel | dtype | head dim | result | shared bytes |  (sm{arch})\n|---|---|---|---|---|")
for dt in ("fp16", "bf16", "fp32"):
    for d in (64, 128):
        data = {name: f"*{dt}" for name in ("Q", "K", "V", "O", "KP", "VP")}
        ints = {name: "*i32" for name in ("IDX", "CNT", "LVL", "LEN")}
        pointers = {**data, **ints, "LSE": "*fp32", "BIAS": "*fp32"}
        kernels = ((_bsa_fwd, {"BLOCK_N": 64, "HAS_LEN": False}), (_bsa_fwd, {"BLOCK_N": 64, "HAS_LEN": True}),
                   (_psa_fwd, {}))  # fmt: skip
        for fn, extra in kernels:
            constants = dict(HEAD_DIM=d, BLOCK=128, BLOCK_M=64, UPCAST=False, IEEE=dt == "fp32", **extra)
            source = ASTSource(fn, signature(fn, pointers, constants), constants)
            options = dict(num_warps=4 if d == 64 else 8, num_stages=2)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                name = fn.__name__ + (" (padded layout)" if extra.get("HAS_LEN") else "")
                print(f"| {name} | {dt} | {d} | cubin ok | {compiled.metadata.shared} |")
            except Exception as e:  # report every failure, then exit non-zero
                failures += 1
                print(f"| {fn.__name__} | {dt} | {d} | FAILED: {str(e).splitlines()[0][:80]} | |")
raise SystemExit(1 if failures else 0)
