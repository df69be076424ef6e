"""Local mode: the operator's planners on one machine, trainer Jobs as local processes."""
