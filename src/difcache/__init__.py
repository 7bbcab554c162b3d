"""difcache: training-free feature caching and block-sparse attention for diffusers."""
