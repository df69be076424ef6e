"""c-BTM's domain discovery measured on the shared corpus (``python -m bench.discovery``)."""
