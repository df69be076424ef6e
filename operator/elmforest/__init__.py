"""elmforest: the Kubernetes operator (and local runner) for Branch-Train-Merge forests."""
