"""elmtrain: the trainer image's CLI for every Branch-Train-Merge step (DESIGN §4)."""
