"""Running models for the pipeline and for other programs: backends (``backends`` local, ``vllm_backend``,
``client`` remote), the model server (``server``) and the dashboard (``dashboard``), with the loopback/token
rules they share (``local_http``)."""
