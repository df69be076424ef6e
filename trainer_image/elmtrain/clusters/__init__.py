"""c-BTM's unsupervised domains (issue 30): a tf-idf + k-means clusterer fitted on a bounded
sample of an unlabeled corpus, stored in the forest, and the assignment of every document to a
cluster (docs/clustering.md).

``sample``: the reservoir; ``fit``: features and k-means (pure, no I/O); ``balance``: c-BTM's
balanced assignment; ``store``: the fitted clusterer as committed files in the forest.
"""
