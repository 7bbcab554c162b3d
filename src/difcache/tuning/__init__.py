"""autotune: schedule, scope and forecaster fitted to a model and a budget (see difcache.tuning.autotune)."""
