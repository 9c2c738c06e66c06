"""The pipeline stages and their data: trait datasets and prompt sets (``traits``, ``prompt_sets``, ``splits``),
the experiment folder (``experiments``), extraction, vector selection, the steering evaluation, monitoring, A/B
propensity curves, vector interchange, reports and the demo that runs them in order."""
