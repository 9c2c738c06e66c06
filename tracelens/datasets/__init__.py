"""Trait datasets, prompt sets and the train / select / test split by question: the data the stages read, below
the judges and the pipeline (``traits``, ``prompt_sets``, ``splits``)."""
