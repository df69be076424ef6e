"""Pure decisions: from (spec, observed state) to the status to show and the actions to take.

Nothing here performs I/O; the reconcilers observe, call a planner, and apply what it returns.
"""
