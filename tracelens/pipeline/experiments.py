"""Experiments: `experiments/{name}/config.json` and every path of an experiment's layout.

All paths of the on-disk layout are built here and nowhere else. The root is `$TRACELENS_EXPERIMENTS`,
else `./experiments`. Config (as the original):

    {"defaults": {"extraction": "instruct", "application": "instruct"},
     "model_variants": {"instruct": {"model": "default", "lora": null}},
     "use_chat_template": true}

A variant's ``lora`` (a peft adapter folder, or an id in the local HF cache; relative paths from the working
directory, as ``model``) is merged into its model wherever the variant loads (`LocalBackend.from_experiment`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tracelens.errors import ConfigError, DataError, MissingArtifactError, UnknownKeyError
from tracelens.io import write_json
from tracelens.model.positions import sanitize_position
from tracelens.pipeline.splits import SPLITS
from tracelens.types import ModelVariant, SteeringEntry

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MODES = ("application", "extraction")


def experiments_root() -> Path:
    return Path(os.environ.get("TRACELENS_EXPERIMENTS", "experiments")).expanduser()


@dataclass(frozen=True)
class Experiment:
    """One experiment folder; methods return paths in its layout (nothing is created)."""

    name: str
    root: Path

    @classmethod
    def named(cls, name: str, root: Path | None = None) -> "Experiment":
        check_name(name, "experiment")
        return cls(name, Path(root) if root is not None else experiments_root())

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def config(self) -> dict:
        path = self.config_path
        if not path.is_file():
            raise MissingArtifactError(f"experiment {self.name!r} has no config at {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(config.get("model_variants"), dict) or not config["model_variants"]:
            raise DataError(f"{path} needs a non-empty 'model_variants' object")
        return config

    def write_config(self, model_variants: dict[str, dict], defaults: dict[str, str] | None = None,
                     use_chat_template: bool | None = None) -> None:
        config = {"defaults": defaults or {}, "model_variants": model_variants}
        if use_chat_template is not None:
            config["use_chat_template"] = use_chat_template
        write_json(self.config_path, config)

    # --- extraction -----------------------------------------------------------------------------

    def extraction_dir(self, trait: str, variant: str) -> Path:
        return self.dir / "extraction" / Path(*check_name(trait, "trait", None)) / check_name(variant, "variant")[0]

    def responses_dir(self, trait: str, variant: str) -> Path:
        return self.extraction_dir(trait, variant) / "responses"

    def vetting_path(self, trait: str, variant: str) -> Path:
        return self.extraction_dir(trait, variant) / "vetting" / "response_scores.json"

    def activations_dir(self, trait: str, variant: str, position: str, component: str) -> Path:
        return self.extraction_dir(trait, variant) / "activations" / sanitize_position(position) / component

    def activations_path(self, trait: str, variant: str, position: str, component: str, split: str) -> Path:
        """`{split}_all_layers.safetensors` (split: train, select or test) beside the activations' metadata."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}; got {split!r}")
        return self.activations_dir(trait, variant, position, component) / f"{split}_all_layers.safetensors"

    def vectors_root(self, trait: str, variant: str, position: str, component: str) -> Path:
        """The folder holding one sub-folder per extraction method."""
        return self.extraction_dir(trait, variant) / "vectors" / sanitize_position(position) / component

    def vectors_dir(self, trait: str, variant: str, position: str, component: str, method: str) -> Path:
        return self.vectors_root(trait, variant, position, component) / check_name(method, "method")[0]

    def vector_path(self, trait: str, variant: str, position: str, component: str, method: str, layer: int) -> Path:
        return self.vectors_dir(trait, variant, position, component, method) / f"layer{layer}.safetensors"

    def evaluation_path(self, trait: str, variant: str, position: str, component: str) -> Path:
        return self.extraction_dir(trait, variant) / "evaluation" / sanitize_position(position) / f"{component}.json"

    # --- steering -------------------------------------------------------------------------------

    def steering_dir(self, trait: str, variant: str, position: str, prompt_set: str = "steering") -> Path:
        return (self.dir / "steering" / Path(*check_name(trait, "trait", None)) / check_name(variant, "variant")[0]
                / sanitize_position(position) / check_name(prompt_set, "prompt set")[0])

    def steering_results_path(self, trait: str, variant: str, position: str, prompt_set: str = "steering") -> Path:
        return self.steering_dir(trait, variant, position, prompt_set) / "results.jsonl"

    def neutral_reference_path(self, variant: str, max_new_tokens: int) -> Path:
        """The unsteered answers to neutral prompts that steering's coherence cost is measured on."""
        return self.dir / "steering" / "_reference" / check_name(variant, "variant")[0] / f"neutral-{int(max_new_tokens)}.json"

    def steering_variant_dir(self, trait: str, variant: str) -> Path:
        """The folder holding one sub-folder per sanitized position of a trait's steering runs."""
        return self.dir / "steering" / Path(*check_name(trait, "trait", None)) / check_name(variant, "variant")[0]

    def evaluation_dir(self, trait: str, variant: str) -> Path:
        """The folder holding `{sanitized position}/{component}.json` held-out evaluations."""
        return self.extraction_dir(trait, variant) / "evaluation"

    def evaluation_paths(self, trait: str, variant: str) -> list[Path]:
        """The evaluation files that exist for a trait, whatever their position and component."""
        root = self.evaluation_dir(trait, variant)
        return sorted(root.glob("*/*.json")) if root.is_dir() else []

    def steering_results_paths(self, trait: str, variant: str, prompt_set: str = "steering") -> dict[str, Path]:
        """`{sanitized position: results.jsonl}` for every position of a trait that has steering results."""
        root = self.steering_variant_dir(trait, variant)
        name = check_name(prompt_set, "prompt set")[0]
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        return {d.name: d / name / "results.jsonl" for d in dirs if (d / name / "results.jsonl").is_file()}

    def steering_entries(self) -> list[SteeringEntry]:
        """Every ``steering/{trait}/{variant}/{position}/{prompt set}/results.jsonl``, sorted by trait, then path.

        ``position`` is the sanitized folder name (``response_all``), as on disk.
        """
        root = self.stage_root("steering")
        return [
            SteeringEntry(trait, p.parts[-4], p.parts[-3], p.parts[-2], str(p))
            for trait in find_traits(root, lambda t: any((root / t).glob("*/*/*/results.jsonl")))
            for p in sorted((root / trait).glob("*/*/*/results.jsonl"))
        ]

    def stage_root(self, stage: str) -> Path:
        """`extraction/`, `steering/` or `inference/` of the experiment (their sub-folders are traits or variants)."""
        if stage not in ("extraction", "steering", "inference"):
            raise ConfigError(f"stage must be extraction, steering or inference, got {stage!r}")
        return self.dir / stage

    # --- inference (monitoring) -----------------------------------------------------------------

    def inference_dir(self, variant: str) -> Path:
        return self.dir / "inference" / check_name(variant, "variant")[0]

    def inference_responses_dir(self, variant: str, prompt_set: str | None = None) -> Path:
        """`responses/` of a variant, or the folder of one prompt set."""
        base = self.inference_dir(variant) / "responses"
        return base if prompt_set is None else base / check_name(prompt_set, "prompt set")[0]

    def inference_response_path(self, variant: str, prompt_set: str, prompt_id: str | int) -> Path:
        name = check_name(str(prompt_id), "prompt id")[0]
        return self.inference_responses_dir(variant, prompt_set) / f"{name}.json"

    def projections_dir(self, variant: str, trait: str | None = None) -> Path:
        """`projections/` of a variant, or the folder of one trait ("category/name")."""
        base = self.inference_dir(variant) / "projections"
        return base if trait is None else base / Path(*check_name(trait, "trait", None))

    def projection_path(self, variant: str, trait: str, prompt_set: str, prompt_id: str | int) -> Path:
        name = check_name(str(prompt_id), "prompt id")[0]
        return self.projections_dir(variant, trait) / check_name(prompt_set, "prompt set")[0] / f"{name}.json"

    def massive_activations_path(self, variant: str, name: str = "calibration") -> Path:
        """`massive_activations/{name}.json`: the passive "calibration" or a deliberate run's prompt set."""
        return self.inference_dir(variant) / "massive_activations" / f"{check_name(name, 'prompt set')[0]}.json"


def check_name(value: object, what: str, max_parts: int | None = 1, hint: str = "") -> list[str]:
    """The "/"-separated parts of a name that becomes folders (an experiment, trait, variant, prompt set, ...).

    The one rule for every name: each part starts with a letter or digit and holds only letters, digits, '.', '_'
    and '-', so no part is empty, '.', '..', hidden or absolute, and '_'-prefixed folders stay tracelens' own
    (``steering/_reference``). At most `max_parts` parts: 1 for every name but a trait's, which may nest
    (``None``: any number, e.g. "starter/optimism" or "base/alignment/deception"). ConfigError otherwise, with
    `hint` appended.
    """
    example = "'default'" if max_parts == 1 else "'starter/optimism'"
    if not isinstance(value, str):
        raise ConfigError(f"invalid {what} name {value!r}: {what} must be a string like {example}; "
                          f"got {type(value).__name__}{hint}")
    parts = value.split("/")
    if (max_parts is not None and len(parts) > max_parts) or not all(map(_SEGMENT.match, parts)):
        shape = "one folder name" if max_parts == 1 else "a relative name"
        raise ConfigError(
            f"invalid {what} name {value!r}: expected {shape} like {example} whose '/'-separated parts start with a "
            f"letter or digit and hold only letters, digits, '.', '_' and '-' (no empty, '.', '..' or absolute "
            f"parts){hint}"
        )
    return parts


def find_traits(root: Path, is_trait: Callable[[str], bool]) -> list[str]:
    """Names of the trait folders under `root`, sorted: the shallowest folders (of valid name parts, so never
    ``_reference``) whose name `is_trait` accepts. Traits may nest ("starter/optimism", "base/alignment/deception"),
    so `is_trait` says what a trait holds, e.g. ``lambda t: bool(exp.evaluation_paths(t, variant))``."""
    found, todo = [], [root] if root.is_dir() else []
    while todo:
        for sub in todo.pop().iterdir():
            if not (sub.is_dir() and _SEGMENT.match(sub.name)):
                continue
            name = sub.relative_to(root).as_posix()
            if is_trait(name):
                found.append(name)
            else:
                todo.append(sub)
    return sorted(found)


def get_model_variant(experiment: str | Experiment, variant: str | None = None, mode: str = "application") -> ModelVariant:
    """The experiment's model variant: `variant`, else `defaults[mode]`, else the first one listed."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    exp = experiment if isinstance(experiment, Experiment) else Experiment.named(experiment)
    config = exp.config()
    variants = config["model_variants"]
    name = variant or config.get("defaults", {}).get(mode) or next(iter(variants))
    if name not in variants:
        raise UnknownKeyError(f"experiment {exp.name!r} has no model variant {name!r}; it has {sorted(variants)}")
    entry = variants[name] if isinstance(variants[name], dict) else {}
    model, lora = entry.get("model"), entry.get("lora")
    where = f"{exp.config_path}: model_variants.{name}"
    if not isinstance(model, str) or not model:
        raise DataError(f"{where}.model must be a non-empty string; got {model!r}")
    if lora is not None and (not isinstance(lora, str) or not lora):
        raise DataError(f"{where}.lora must be a non-empty string or null; got {lora!r}")
    return ModelVariant(name=name, model=model, lora=lora)
