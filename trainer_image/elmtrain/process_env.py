"""Settings torch reads once per process, before its first allocation: the entry points
(``elmtrain``, ``elmtrain-torchrun``) set them before anything imports torch.

``THP_MEM_ALLOC_ENABLE=1``: c10's CPU allocator aligns every allocation of 2 MB or more to a
huge page and asks the kernel for huge pages there (``madvise(MADV_HUGEPAGE)``; nodes default
to ``madvise`` mode). A training step on CPU allocates and frees hundreds of MB of activations,
logits and gradients, and freed blocks that large go back to the kernel, so every step faults
its buffers in again: 65,000 4-KB page faults per step for GPT-2 4 x 256 at 16 x 256 tokens
(``bench/train.py``'s model), about 6,000-12,000 with huge pages. The math is unchanged.
A value the user or the pod already set wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    for name, value in DEFAULTS.items():
        environ.setdefault(name, value)
