"""When the operator reconciles what: the branch worker's queue and batches, the forests'
wake-ups, and the expectations that hold a reconcile back until its own writes come back."""
