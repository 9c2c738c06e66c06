"""tracelens: find, validate, monitor and intervene with trait directions, on TransformerLens hooks."""

from tracelens.hooks import (
    ActivationCappingHook,
    AblationHook,
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
from tracelens.loading import load_model
from tracelens.sites import COMPONENTS, detect_contribution_paths, get_hook_path, resolve_hook_name

__all__ = [
    "AblationHook",
    "ActivationCappingHook",
    "COMPONENTS",
    "CaptureHook",
    "HookAdapter",
    "MultiLayerAblation",
    "MultiLayerActivationCapping",
    "MultiLayerCapture",
    "MultiLayerProjection",
    "MultiLayerSteering",
    "PerPositionSteeringHook",
    "PerSampleSteering",
    "ProjectionHook",
    "SteeringHook",
    "calibrate_cap_threshold",
    "detect_contribution_paths",
    "get_hook_path",
    "load_model",
    "resolve_hook_name",
]
