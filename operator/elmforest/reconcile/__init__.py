"""Observe -> plan (pure) -> apply, for each kind. Kopf handlers call into here."""
