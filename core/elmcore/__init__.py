"""Contracts shared by the elmforest trainer and operator.

Everything directly in this package is pure (no torch, no kopf, no network): names, storage
URIs and key layout, the forest manifest and the BTM math. ``elmcore.storage`` holds the thin
I/O adapters (local directory, S3) that both sides use to read and write those contracts.
"""
