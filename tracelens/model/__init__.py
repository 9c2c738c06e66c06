"""The model layer: loading a TransformerLens bridge (``loading``, ``default_model``), naming its hook points
(``sites``), the hook adapters that edit or read them (``hooks``, ``edits``, ``positions``, ``conditional``,
``massive``), prompts and tokenisation (``prompts``), generation with steering and capture (``generation``),
prefill capture (``capture``), response likelihoods (``likelihood``) and memory profiling (``vram``)."""
