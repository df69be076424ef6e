"""Branch-Train-MiX on the shared corpus (``python -m bench.btx``; docs/btx.md): the forest mixed
into one Mixtral model, before and after finetuning, against BTM's ensemble and averages and the
compute-matched dense model, with each one's inference cost."""
