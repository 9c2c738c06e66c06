"""tracelens: find, validate, monitor and intervene with trait directions, on TransformerLens hooks."""

from tracelens.loading import load_model
from tracelens.sites import COMPONENTS, detect_contribution_paths, get_hook_path, resolve_hook_name

__all__ = [
    "COMPONENTS",
    "detect_contribution_paths",
    "get_hook_path",
    "load_model",
    "resolve_hook_name",
]
