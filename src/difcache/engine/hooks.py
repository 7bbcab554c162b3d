"""Installing difcache's hooks with diffusers' ``ModelHook``/``HookRegistry``.

:func:`register` adds a hook to a module's ``HookRegistry`` (so diffusers knows it: ordering with its own hooks,
``cache_context``, removal) and returns a remover that takes out exactly that hook.

Hooks that replace the forward of *repeated* modules (every block, every attention) subclass :class:`ForwardHook`.
diffusers installs each hook as a ``functools.partial`` held by the module instance; ``torch.compile`` guards
on the identity of that object, so regional compilation (``model.compile_repeated_blocks()``, one graph shared
by all blocks of a class) would compile one graph *per block* and hit the recompile limit. A
:class:`ForwardHook` is installed as a bound method instead, whose function is the same for every instance:
the guards then compare the hooks' Python data (their slot's mode), which is equal across blocks. The registry's
own bookkeeping is unchanged, so removal and hooks registered later by anything else still compose exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook


class ForwardHook(ModelHook):
    """A hook with ``new_forward(module, *args, **kwargs)``, installed as a bound method (see above)."""

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.module = module
        return module

    def entry(self, *args: Any, **kwargs: Any) -> Any:
        return self.new_forward(self.module, *args, **kwargs)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> Callable[[], None]:
    """Register ``hook`` on ``module`` under ``name``; return a function that removes exactly that hook."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    if isinstance(hook, ForwardHook):
        # The registry just set module.forward to its partial, which calls hook.new_forward(module, ...): the
        # bound method does the same. The registry restores the forward from its own records on removal.
        module.forward = hook.entry
    return lambda: registry.remove_hook(name, recurse=False)
