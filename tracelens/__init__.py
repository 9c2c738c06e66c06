"""tracelens: find, validate, monitor and intervene with trait directions, on TransformerLens hooks."""

from tracelens.pipeline.ab import ABConfig, ABDataset, ABItem, ABResult, letter_propensity, load_ab, run_ab
from tracelens.pipeline.ab_plot import propensity_svg
from tracelens.serving.backends import (
    CaptureResult,
    CaptureSpec,
    GenerationConfig,
    LocalBackend,
    SteeringSpec,
    TokenResult,
    generate_batch,
)
from tracelens.model.capture import capture_at_position
from tracelens.model.cleaning import clean_scores
from tracelens.serving.client import RemoteBackend, get_backend
from tracelens.model.conditional import Condition, ConditionalSteering, ConditionFit, fit_condition_threshold
from tracelens.serving.dashboard import make_server, serve, serve_in_thread
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
from tracelens.pipeline.experiments import Experiment, get_model_variant
from tracelens.pipeline.extraction import ExtractionConfig, load_activation_metadata, run_extraction
from tracelens.model.generation import CaptureConfig, HookedGenerator, SequenceOutput, SteeringConfig, TokenOutput
from tracelens.model.hooks import (
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
from tracelens.pipeline.interchange import export_vector, import_vector
from tracelens.judges.base import Judge, summarize_judge_scores
from tracelens.judges.degeneracy import Degeneracy, degeneracy
from tracelens.judges.offline import EmbeddingJudge, offline_judge
from tracelens.judges.openai import OpenAIJudge
from tracelens.model.loading import load_model
from tracelens.model.massive import MassiveDimCollector, candidate_dims
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
from tracelens.pipeline.monitoring import MonitorConfig, run_massive, run_monitoring
from tracelens.model.positions import parse_position, resolve_position, sanitize_position, tokens_needed
from tracelens.pipeline.prompt_sets import Prompt, PromptSet, list_prompt_sets, load_prompt_set
from tracelens.model.prompts import format_prompt, tokenize_batch
from tracelens.pipeline.selection import select_vector, select_vectors
from tracelens.serving.server import ModelServer
from tracelens.model.sites import COMPONENTS, detect_contribution_paths, get_hook_path, resolve_hook_name
from tracelens.pipeline.traits import (
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
from tracelens.serving.vllm_backend import VLLMBackend, detect_quantization
from tracelens.model.vram import Profile, bandwidth_report, find_cuda_tensors, gpu_profile, memory_stats, tensor_size_gb

# Every name imported above stays importable from ``tracelens`` (the seed's ``from core import ...`` names among
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
    "load_trait", "Experiment", "run_extraction", "select_vector", "select_vectors", "run_monitoring", "run_ab",
    "export_vector", "import_vector",
    # judges
    "OpenAIJudge", "offline_judge", "summarize_judge_scores", "degeneracy",
    # records and errors
    "VectorSpec", "ProjectionConfig", "VectorResult", "JudgeResult", "ModelVariant", "TracelensError",
]
