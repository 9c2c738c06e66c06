"""tracelens: find, validate, monitor and intervene with trait directions, on TransformerLens hooks.

Names load on first use (`__getattr__`), so `import tracelens` and the command line's `--help` stay cheap: nothing
below imports torch, TransformerLens, the server, the dashboard or vLLM until a name from it is asked for."""

from __future__ import annotations

import importlib

# where each public name lives, by module
_EXPORTS: dict[str, tuple[str, ...]] = {
    "tracelens.errors": (
        "ABDataError", "BackendError", "ConfigError", "DataError", "DirectionError", "GenerationCancelled",
        "InputTypeError", "JudgeError", "MissingArtifactError", "PromptSetError", "RequestError", "ServerError",
        "ShapeError", "StateError", "TracelensError", "TraitDataError", "UnknownKeyError",
    ),
    "tracelens.judges.base": ("Judge", "summarize_judge_scores"),
    "tracelens.judges.degeneracy": ("Degeneracy", "degeneracy"),
    "tracelens.judges.offline": ("EmbeddingJudge", "offline_judge"),
    "tracelens.judges.openai": ("OpenAIJudge",),
    "tracelens.math": (
        "batch_cosine_similarity", "compute_top_pcs_by_variance", "cosine_similarity", "denoise_with_pcs",
        "grand_mean_center", "normalize_projections", "orthogonalize", "pairwise_cosine_matrix", "pca",
        "pca_norm_correlation", "project_out_subspace", "projection", "remove_massive_dims",
        "representational_similarity", "trait_clusters", "vector_set_comparison",
    ),
    "tracelens.methods": (
        "ExtractionMethod", "Fisher", "Gradient", "METHODS", "MeanDiff", "PreCleanedMethod", "Probe", "RFM",
        "RandomBaseline", "get_method",
    ),
    "tracelens.metrics": ("accuracy", "auroc", "effect_size", "pearson_correlation", "polarity_correct"),
    "tracelens.model.capture": ("capture_at_position",),
    "tracelens.model.cleaning": ("clean_scores",),
    "tracelens.model.conditional": ("Condition", "ConditionFit", "ConditionalSteering", "fit_condition_threshold"),
    "tracelens.model.generation": (
        "CaptureConfig", "HookedGenerator", "SequenceOutput", "SteeringConfig", "TokenOutput",
    ),
    "tracelens.model.hooks": (
        "AblationHook", "ActivationCappingHook", "CaptureHook", "HookAdapter", "MultiLayerAblation",
        "MultiLayerActivationCapping", "MultiLayerCapture", "MultiLayerProjection", "MultiLayerSteering",
        "PerPositionSteeringHook", "PerSampleSteering", "ProjectionHook", "SteeringHook", "calibrate_cap_threshold",
    ),
    "tracelens.model.loading": ("load_model",),
    "tracelens.model.massive": ("MassiveDimCollector", "candidate_dims"),
    "tracelens.model.positions": ("parse_position", "resolve_position", "sanitize_position", "tokens_needed"),
    "tracelens.model.prompts": ("format_prompt", "tokenize_batch"),
    "tracelens.model.sites": ("COMPONENTS", "detect_contribution_paths", "get_hook_path", "resolve_hook_name"),
    "tracelens.model.vram": (
        "Profile", "bandwidth_report", "find_cuda_tensors", "gpu_profile", "memory_stats", "tensor_size_gb",
    ),
    "tracelens.pipeline.ab": ("ABConfig", "ABDataset", "ABItem", "ABResult", "letter_propensity", "load_ab", "run_ab"),
    "tracelens.pipeline.ab_plot": ("propensity_svg",),
    "tracelens.store": ("Experiment", "get_model_variant"),
    "tracelens.pipeline.extraction": ("ExtractionConfig", "load_activation_metadata", "run_extraction"),
    "tracelens.pipeline.interchange": ("export_vector", "import_vector"),
    "tracelens.pipeline.monitoring": ("MonitorConfig", "run_massive", "run_monitoring"),
    "tracelens.datasets.prompt_sets": ("Prompt", "PromptSet", "list_prompt_sets", "load_prompt_set"),
    "tracelens.pipeline.selection": ("select_vector", "select_vectors"),
    "tracelens.pipeline.steering_eval": ("SteeringEvalConfig", "run_steering_eval"),
    "tracelens.datasets.traits": (
        "JudgeCorpus", "Scenario", "SteeringQuestions", "TraitDataset", "list_traits", "load_trait",
    ),
    "tracelens.serving.backends": (
        "CaptureResult", "CaptureSpec", "GenerationConfig", "LocalBackend", "SteeringSpec", "TokenResult",
        "generate_batch",
    ),
    "tracelens.serving.client": ("RemoteBackend", "get_backend"),
    "tracelens.app.dashboard": ("make_server", "serve", "serve_in_thread"),
    "tracelens.app.server": ("ModelServer",),
    "tracelens.serving.vllm_backend": ("VLLMBackend", "detect_quantization"),
    "tracelens.types": (
        "ActivationMetadata", "JudgeResult", "ModelConfig", "ModelVariant", "ProjectionConfig", "ProjectionEntry",
        "ProjectionRecord", "ResponseRecord", "SteeringEntry", "SteeringResults", "SteeringRunRecord", "VectorResult",
        "VectorSpec",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    """Import the module that defines `name` on first use and keep the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tracelens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


# Every name in ``_EXPORTS`` stays importable from ``tracelens`` (the seed's ``from core import ...`` names among
# them); ``__all__`` lists the ones a user starts from. The sub-packages: ``model`` (loading, sites, hook
# adapters, generation, capture), ``methods`` (extraction methods), ``pipeline`` (traits, experiments and the
# stages), ``judges``, ``serving`` (backends, model server, client, dashboard); errors in ``tracelens.errors``.
__all__ = [
    # models, hook points and adapters
    "load_model", "get_hook_path", "detect_contribution_paths", "resolve_hook_name",
    "CaptureHook", "MultiLayerCapture", "SteeringHook", "MultiLayerSteering", "PerPositionSteeringHook",
    "PerSampleSteering", "AblationHook", "MultiLayerAblation", "ActivationCappingHook", "MultiLayerActivationCapping",
    "ProjectionHook", "MultiLayerProjection", "ConditionalSteering",
    # generation and capture
    "format_prompt", "capture_at_position", "HookedGenerator", "CaptureConfig", "SteeringConfig",
    "LocalBackend", "RemoteBackend", "VLLMBackend", "get_backend", "GenerationConfig", "SteeringSpec", "CaptureSpec",
    # directions
    "get_method", "projection", "cosine_similarity",
    # the pipeline
    "load_trait", "Experiment", "run_extraction", "run_steering_eval", "select_vector", "select_vectors",
    "run_monitoring", "run_ab", "export_vector", "import_vector",
    # judges
    "OpenAIJudge", "offline_judge", "summarize_judge_scores", "degeneracy",
    # records and errors
    "VectorSpec", "ProjectionConfig", "VectorResult", "JudgeResult", "ModelVariant", "TracelensError",
]
