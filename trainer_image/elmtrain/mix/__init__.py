"""Branch-Train-MiX: a forest's Llama-family experts as one Mixtral mixture-of-experts model.

``plan`` names the tensors and writes the config (pure), ``router`` initialises the router rows
(pure numpy), ``centroids`` measures the experts' hidden states (torch), ``build`` streams the
weights into an HF folder, and ``lineage`` is the record written beside them.
"""
