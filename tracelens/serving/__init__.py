"""Running models for the pipeline and for other programs: backends (``backends`` local, ``vllm_backend``,
``tl_vllm_backend``, ``client`` remote) and the wire formats they share (``codec``, ``parsing``, ``openai_api``).
The model server that puts a backend on HTTP is `tracelens.app.server`."""
