"""The pipeline stages: extraction, vector selection, the steering evaluation, monitoring, A/B propensity curves,
vector interchange, reports and the demo that runs them in order. They read and write through `tracelens.store`
and their data comes from `tracelens.datasets`."""
