"""tracelens: find, validate, monitor and intervene with trait directions, on TransformerLens hooks."""

from tracelens.ab import ABConfig, ABDataset, ABItem, ABResult, letter_propensity, load_ab, run_ab
from tracelens.ab_plot import propensity_svg
from tracelens.backends import (
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    LocalBackend,
    SteeringSpec,
    TokenResult,
    generate_batch,
)
from tracelens.capture import capture_at_position
from tracelens.cleaning import clean_scores
from tracelens.client import RemoteBackend, get_backend
from tracelens.conditional import Condition, ConditionalSteering, ConditionFit, fit_condition_threshold
from tracelens.dashboard import make_server, serve, serve_in_thread
from tracelens.errors import (
    ABDataError,
    BackendError,
    ConfigError,
    DataError,
    DirectionError,
    GenerationCancelled,
    InputTypeError,
    JudgeError,
    MissingArtifactError,
    PromptSetError,
    RequestError,
    ServerError,
    ShapeError,
    StateError,
    TraitDataError,
    TracelensError,
    UnknownKeyError,
)
from tracelens.experiments import Experiment, get_model_variant
from tracelens.extraction import ExtractionConfig, load_activation_metadata, run_extraction
from tracelens.generation import CaptureConfig, HookedGenerator, SequenceOutput, SteeringConfig, TokenOutput
from tracelens.hooks import (
    AblationHook,
    ActivationCappingHook,
    CaptureHook,
    HookAdapter,
    MultiLayerAblation,
    MultiLayerActivationCapping,
    MultiLayerCapture,
    MultiLayerProjection,
    MultiLayerSteering,
    PerPositionSteeringHook,
    PerSampleSteering,
    ProjectionHook,
    SteeringHook,
    calibrate_cap_threshold,
)
from tracelens.interchange import export_vector, import_vector
from tracelens.judge import (
    Degeneracy,
    EmbeddingJudge,
    Judge,
    OpenAIJudge,
    degeneracy,
    offline_judge,
    summarize_judge_scores,
)
from tracelens.loading import load_model
from tracelens.massive import MassiveDimCollector, candidate_dims
from tracelens.math import (
    batch_cosine_similarity,
    compute_top_pcs_by_variance,
    cosine_similarity,
    denoise_with_pcs,
    grand_mean_center,
    normalize_projections,
    orthogonalize,
    pairwise_cosine_matrix,
    pca,
    pca_norm_correlation,
    project_out_subspace,
    projection,
    remove_massive_dims,
    representational_similarity,
    trait_clusters,
    vector_set_comparison,
)
from tracelens.methods import (
    METHODS,
    RFM,
    ExtractionMethod,
    Fisher,
    Gradient,
    MeanDiff,
    PreCleanedMethod,
    Probe,
    RandomBaseline,
    get_method,
)
from tracelens.metrics import accuracy, auroc, effect_size, pearson_correlation, polarity_correct
from tracelens.monitoring import MonitorConfig, run_massive, run_monitoring
from tracelens.positions import parse_position, resolve_position, sanitize_position, tokens_needed
from tracelens.prompt_sets import Prompt, PromptSet, list_prompt_sets, load_prompt_set
from tracelens.prompts import format_prompt, tokenize_batch
from tracelens.selection import select_vector, select_vectors
from tracelens.server import ModelServer
from tracelens.sites import COMPONENTS, detect_contribution_paths, get_hook_path, resolve_hook_name
from tracelens.traits import (
    JudgeCorpus,
    Scenario,
    SteeringQuestions,
    TraitDataset,
    list_traits,
    load_trait,
)
from tracelens.types import (
    ActivationMetadata,
    JudgeResult,
    ModelConfig,
    ModelVariant,
    ProjectionConfig,
    ProjectionEntry,
    ProjectionRecord,
    ResponseRecord,
    SteeringEntry,
    SteeringResults,
    SteeringRunRecord,
    VectorResult,
    VectorSpec,
)
from tracelens.vllm_backend import VLLMBackend, detect_quantization
from tracelens.vram import Profile, bandwidth_report, find_cuda_tensors, gpu_profile, memory_stats, tensor_size_gb

__all__ = [
    # loading and hook sites
    "load_model", "COMPONENTS", "get_hook_path", "detect_contribution_paths", "resolve_hook_name",
    # hook adapters
    "HookAdapter", "CaptureHook", "MultiLayerCapture", "SteeringHook", "MultiLayerSteering",
    "PerPositionSteeringHook", "PerSampleSteering", "AblationHook", "MultiLayerAblation",
    "ActivationCappingHook", "MultiLayerActivationCapping", "calibrate_cap_threshold",
    "ProjectionHook", "MultiLayerProjection", "ConditionalSteering", "Condition", "fit_condition_threshold",
    "ConditionFit",
    # extraction methods
    "get_method", "METHODS", "ExtractionMethod", "MeanDiff", "Probe", "Gradient", "Fisher", "RandomBaseline", "RFM",
    "PreCleanedMethod",
    # vector math and metrics
    "projection", "batch_cosine_similarity", "cosine_similarity", "orthogonalize", "pairwise_cosine_matrix",
    "pca", "project_out_subspace", "grand_mean_center", "compute_top_pcs_by_variance", "denoise_with_pcs",
    "trait_clusters", "representational_similarity", "pca_norm_correlation", "vector_set_comparison",
    "remove_massive_dims", "normalize_projections",
    "accuracy", "effect_size", "polarity_correct", "pearson_correlation", "auroc",
    # positions, prompts, capture and generation
    "parse_position", "resolve_position", "tokens_needed", "sanitize_position", "format_prompt", "tokenize_batch",
    "capture_at_position", "HookedGenerator", "CaptureConfig", "SteeringConfig", "TokenOutput", "SequenceOutput",
    "LocalBackend", "GenerationConfig", "SteeringSpec", "CaptureSpec", "CaptureResult", "TokenResult", "generate_batch",
    # records
    "VectorSpec", "ProjectionConfig", "VectorResult", "JudgeResult", "ModelVariant", "ActivationMetadata",
    "ResponseRecord", "ProjectionEntry", "ProjectionRecord", "SteeringRunRecord", "SteeringResults", "SteeringEntry",
    "ModelConfig",
    # judges
    "Judge", "OpenAIJudge", "EmbeddingJudge", "summarize_judge_scores", "offline_judge", "degeneracy",
    "Degeneracy",
    # traits, experiments and the pipeline
    "load_trait", "list_traits", "TraitDataset", "Scenario", "SteeringQuestions", "JudgeCorpus",
    "Experiment", "get_model_variant", "ExtractionConfig", "run_extraction", "load_activation_metadata",
    "select_vector", "select_vectors",
    # A/B datasets and propensity curves, vector interchange
    "load_ab", "run_ab", "ABConfig", "ABResult", "ABDataset", "ABItem", "letter_propensity",
    "propensity_svg", "export_vector", "import_vector",
    # monitoring, massive activations, prompt sets, profiling
    "run_monitoring", "MonitorConfig", "run_massive", "MassiveDimCollector", "candidate_dims", "clean_scores",
    "serve", "make_server", "serve_in_thread",
    "load_prompt_set", "list_prompt_sets", "PromptSet", "Prompt",
    "VLLMBackend", "detect_quantization", "ModelServer", "RemoteBackend", "get_backend",
    "gpu_profile", "Profile", "memory_stats", "find_cuda_tensors", "bandwidth_report", "tensor_size_gb",
    # errors (tracelens.errors)
    "TracelensError", "ConfigError", "ShapeError", "DirectionError", "DataError", "TraitDataError", "PromptSetError",
    "ABDataError", "MissingArtifactError", "UnknownKeyError", "InputTypeError", "BackendError", "JudgeError",
    "ServerError", "StateError", "GenerationCancelled", "RequestError",
]
