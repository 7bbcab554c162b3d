"""FLOPs of one denoiser call, in total and per unit, measured once per input shape.

``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and the CUDA attention kernels per
module; the CPU flash-attention op that ``scaled_dot_product_attention`` dispatches to on this machine is not
in its registry, so a formula for it is added here (2·B·H·Sq·Sk·(D + Dv), as for the other SDPA kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    batch, heads, q_len, dim = query
    return 2 * batch * heads * q_len * key[-2] * (dim + value[-1])


_CUSTOM = {_aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def measure_flops(
    unit_modules: Sequence[Sequence[torch.nn.Module]], run: Callable[[], Any]
) -> tuple[Any, int, list[int]]:
    """Run ``run()`` under a FLOP counter; return its result, the total FLOPs and the FLOPs of each unit.

    Per-unit FLOPs are the counter's growth between a unit's entry and exit (forward pre/post hooks), which
    does not depend on the counter having seen the root module start (it starts inside the root's forward).
    Units never nest inside each other in a layout, so the deltas add up; a unit standing for several modules
    (a range of blocks) gets the sum over them.
    """
    per_unit = [0] * len(unit_modules)
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        handles = []
        for i, module in ((i, m) for i, members in enumerate(unit_modules) for m in members):
            entry: list[int] = []
            handles.append(module.register_forward_pre_hook(lambda *_, e=entry: e.append(counter.get_total_flops())))
            handles.append(
                module.register_forward_hook(
                    lambda *_, i=i, e=entry: per_unit.__setitem__(i, per_unit[i] + counter.get_total_flops() - e.pop())
                )
            )
        try:
            result = run()
        finally:
            for handle in handles:
                handle.remove()
    return result, counter.get_total_flops(), per_unit


def measure_flops_without_running(
    model: torch.nn.Module, unit_modules: Sequence[Sequence[torch.nn.Module]], args: tuple, kwargs: dict
) -> tuple[int, list[int]]:
    """FLOPs of ``model``'s own forward on the shapes of ``args``/``kwargs``, counted on fake tensors.

    For calls that ran compiled, where no counter can watch: the model's class forward is run eagerly
    (compiled regions forced eager) on fake copies of the inputs, so nothing is computed and instance-level
    hooks on the model itself are bypassed; hooks on sub-modules see no tracked call and pass through.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    with torch.compiler.set_stance("force_eager"), torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args, fake_kwargs = tree_map(
            lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, (args, kwargs)
        )
        _, total, per_unit = measure_flops(unit_modules, lambda: type(model).forward(model, *fake_args, **fake_kwargs))
    return total, per_unit
