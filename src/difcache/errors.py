"""The one exception type difcache raises for user-facing misuse, and the refusal to copy hooked objects."""


class DifcacheError(ValueError):
    """Raised for every user-facing misuse; the message says what to do instead."""


NO_COPY = (
    "A denoiser with difcache's hooks cannot be copied or pickled: the copy would share the original's hooks. "
    "Copy the model before difcache.apply_cache (or handle.remove(), copy, and apply a cache to each copy); to "
    "save weights use model.state_dict() or save_pretrained()."
)


class Uncopyable:
    """Mixin for what difcache installs on a model (runtimes, trackers, handles): ``copy.deepcopy`` and pickling
    raise :class:`DifcacheError` with :data:`NO_COPY`, because a copy would share the original's hooks."""

    def __deepcopy__(self, memo: dict) -> object:
        raise DifcacheError(NO_COPY)

    def __reduce_ex__(self, protocol: object) -> object:
        raise DifcacheError(NO_COPY)
