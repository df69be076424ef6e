"""Thin I/O adapters: the forest's storage and the Kubernetes API."""
