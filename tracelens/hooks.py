"""The seed's import path for the hook adapters (``from tracelens.hooks import SteeringHook``); they live in
``tracelens.model.hooks``, and these are the same objects."""

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
    SiteEdit,
    SiteRead,
    SteeringHook,
    calibrate_cap_threshold,
)

__all__ = [
    "HookAdapter", "SiteEdit", "SiteRead", "CaptureHook", "MultiLayerCapture", "SteeringHook", "MultiLayerSteering",
    "PerPositionSteeringHook", "PerSampleSteering", "AblationHook", "MultiLayerAblation", "ActivationCappingHook",
    "MultiLayerActivationCapping", "ProjectionHook", "MultiLayerProjection", "calibrate_cap_threshold",
]
