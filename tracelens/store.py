"""The artifact store: `experiments/{name}/` and every file in it.

This module alone knows the on-disk layout of an experiment: every folder and file name is built here, and
every artifact is read and written here, as the typed records of `tracelens.types` (safetensors for tensors,
JSON / JSONL for the rest; writes are atomic and appends survive a torn last line, see `tracelens.io`;
nothing loads by executing code). Pipeline stages hold an `Experiment` and never join paths themselves
(`tests/test_store.py` fails if they do). The root is `$TRACELENS_EXPERIMENTS`, else `./experiments`.

    config.json
    extraction/{trait}/{variant}/
        responses/pos.json, neg.json, metadata.json       ScenarioResponse rows, ResponsesMetadata
        vetting/response_scores.json                      Vetting
        activations/{position}/{component}/{train,select,test}_all_layers.safetensors, metadata.json
                                                          [2n, n_layers, d] tensors (pos rows, then neg), ActivationMetadata
        vectors/{position}/{component}/{method}/layer{N}.safetensors, metadata.json
                                                          unit float32 "vector", VectorMetadata
        evaluation/{position}/{component}.json            Evaluation
    steering/{trait}/{variant}/{position}/{prompt set}/results.jsonl      SteeringResults, one line per record
    steering/_reference/{variant}/neutral-{max_new_tokens}.json         NeutralReference
    inference/{variant}/responses/{prompt set}/{id}.json                ResponseRecord
    inference/{variant}/projections/{trait}/{prompt set}/{id}.json      ProjectionRecord
    inference/{variant}/massive_activations/{name}.json                 massive-dim calibration
    report.md                                                           the demo's Markdown report

``{position}`` is the sanitized position (``response[:]`` -> ``response_all``). Config (as the original):

    {"defaults": {"extraction": "instruct", "application": "instruct"},
     "model_variants": {"instruct": {"model": "default", "lora": null}},
     "use_chat_template": true}

A variant's ``lora`` (a peft adapter folder, or an id in the local HF cache; relative paths from the working
directory, as ``model``) is merged into its model wherever the variant loads (`LocalBackend.from_experiment`).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from tracelens.errors import ConfigError, DataError, MissingArtifactError, UnknownKeyError
from tracelens.io import SEGMENT, append_jsonl, check_name, load_tensors, read_json, read_jsonl, save_tensors, unique_sibling, write_json
from tracelens.model.positions import sanitize_position
from tracelens.datasets.splits import SPLITS
from tracelens.types import (
    ActivationMetadata,
    CoherenceSet,
    Evaluation,
    ModelVariant,
    NeutralReference,
    ProjectionRecord,
    ResponseRecord,
    ResponsesMetadata,
    ScenarioResponse,
    SteeringEntry,
    SteeringHeader,
    SteeringResults,
    SteeringRunRecord,
    VectorMetadata,
    Vetting,
)

MODES = ("application", "extraction")
STAGES = ("responses", "vetting", "activations", "vectors", "evaluation")  # extraction stages, in order
_LAYER_FILE = re.compile(r"^layer(\d+)\.safetensors$")


def experiments_root() -> Path:
    return Path(os.environ.get("TRACELENS_EXPERIMENTS", "experiments")).expanduser()


@dataclass(frozen=True)
class Experiment:
    """One experiment folder: its paths (nothing is created by asking) and typed reads and writes of every
    artifact in it. Readers raise MissingArtifactError naming the command that writes the artifact."""

    name: str
    root: Path
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def named(cls, name: str, root: Path | None = None) -> "Experiment":
        check_name(name, "experiment")
        return cls(name, Path(root) if root is not None else experiments_root())

    @classmethod
    def of(cls, experiment: "str | Experiment", root: Path | None = None) -> "Experiment":
        """The one way a stage is handed its experiment: an `Experiment` as is, a name under `root`
        (default `$TRACELENS_EXPERIMENTS`, else `./experiments`)."""
        return experiment if isinstance(experiment, Experiment) else cls.named(experiment, root)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def config(self) -> dict:
        """The parsed `config.json` (a copy). Read once per `Experiment` and cached; read again only after
        `write_config` or when the file changed on disk (its mtime, size or inode)."""
        path = self.config_path
        if not path.is_file():
            raise MissingArtifactError(f"experiment {self.name!r} has no config at {path}")
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache.get("config_key") != key:
            self._cache.update(config=_load_config(path), config_key=key)
        return copy.deepcopy(self._cache["config"])

    def write_config(self, model_variants: dict[str, dict], defaults: dict[str, str] | None = None,
                     use_chat_template: bool | None = None) -> None:
        config = {"defaults": defaults or {}, "model_variants": model_variants}
        if use_chat_template is not None:
            config["use_chat_template"] = use_chat_template
        write_json(self.config_path, config)
        self._cache.pop("config_key", None)

    @property
    def report_path(self) -> Path:
        """`report.md`, where `tracelens demo` writes the experiment's Markdown report."""
        return self.dir / "report.md"

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

    # --- extraction artifacts -------------------------------------------------------------------

    def stage_current(self, stage: str, input_hash: str, force: bool, trait: str, variant: str,
                      position: str | None = None, component: str | None = None, method: str | None = None) -> bool:
        """True when an extraction stage's outputs carry `input_hash` (and not `force`): the stage can be
        skipped. Otherwise its metadata is deleted before the stage writes anything, so a crash mid-stage
        never leaves files that metadata vouches for. `stage` is one of `STAGES`; activations, vectors and
        evaluation need `position` and `component`, vectors also `method`."""
        path = self._stage_metadata_path(stage, trait, variant, position, component, method)
        if not force and path.is_file() and read_json(path).get("input_hash") == input_hash:
            return True
        path.unlink(missing_ok=True)
        return False

    def _stage_metadata_path(self, stage: str, trait: str, variant: str, position: str | None = None,
                             component: str | None = None, method: str | None = None) -> Path:
        """The file whose `input_hash` vouches for a stage's outputs (its metadata, or the evaluation itself)."""
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}; got {stage!r}")
        if stage in ("responses", "vetting"):
            return (self.responses_dir(trait, variant) / "metadata.json" if stage == "responses"
                    else self.vetting_path(trait, variant))
        if position is None or component is None or (stage == "vectors" and method is None):
            raise ConfigError(f"the {stage} stage needs a position, a component"
                              f"{' and a method' if stage == 'vectors' else ''}; got {position!r}, {component!r}")
        if stage == "activations":
            return self.activations_dir(trait, variant, position, component) / "metadata.json"
        if stage == "vectors":
            return self.vectors_dir(trait, variant, position, component, method) / "metadata.json"
        return self.evaluation_path(trait, variant, position, component)

    def write_responses(self, trait: str, variant: str, pos: list[ScenarioResponse], neg: list[ScenarioResponse],
                        metadata: ResponsesMetadata) -> None:
        """`pos.json`, `neg.json` (row i of both answer scenario pair i), then their metadata."""
        out = self.responses_dir(trait, variant)
        for polarity, rows in (("pos", pos), ("neg", neg)):
            write_json(out / f"{polarity}.json", [r.to_dict() for r in rows])
        write_json(self._stage_metadata_path("responses", trait, variant), metadata.to_dict())

    def responses(self, trait: str, variant: str) -> tuple[list[ScenarioResponse], list[ScenarioResponse]]:
        """`(pos, neg)` answers of the responses stage; row i of both answer scenario pair i."""
        out = self.responses_dir(trait, variant)
        return tuple([ScenarioResponse.from_dict(r) for r in _read(path, "responses", "tracelens extract")]
                     for path in (out / "pos.json", out / "neg.json"))

    def responses_metadata(self, trait: str, variant: str) -> ResponsesMetadata:
        return ResponsesMetadata.from_dict(_read(self._stage_metadata_path("responses", trait, variant),
                                                 "responses metadata", "tracelens extract"))

    def write_vetting(self, trait: str, variant: str, vetting: Vetting) -> None:
        write_json(self.vetting_path(trait, variant), vetting.to_dict())

    def vetting(self, trait: str, variant: str) -> Vetting:
        return Vetting.from_dict(_read(self.vetting_path(trait, variant), "vetting", "tracelens extract --vet"))

    def write_activations(self, trait: str, variant: str, metadata: ActivationMetadata,
                          tensors: Mapping[str, Float[torch.Tensor, "rows layers d"]]) -> None:
        """Each split's `[2n, n_layers, d]` tensor (`cat(pos, neg)`, as given: cast it first), then the
        metadata, at `metadata.position` / `metadata.component`."""
        for split, t in tensors.items():
            save_tensors(self.activations_path(trait, variant, metadata.position, metadata.component, split),
                         {"activations": t})
        write_json(self._stage_metadata_path("activations", trait, variant, metadata.position, metadata.component),
                   metadata.to_dict())

    def activation_metadata(self, trait: str, variant: str, position: str = "response[:]",
                            component: str = "residual") -> ActivationMetadata:
        path = self._stage_metadata_path("activations", trait, variant, position, component)
        return ActivationMetadata.from_dict(_read(path, "activation metadata", "tracelens extract"))

    def activations(self, trait: str, variant: str, position: str, component: str, split: str
                    ) -> tuple[Float[torch.Tensor, "n layers d"], Float[torch.Tensor, "n layers d"]]:
        """`(pos, neg)` activations of one split as float32; row i of both is pair i."""
        t = load_tensors(self.activations_path(trait, variant, position, component, split))["activations"].float()
        return t[: len(t) // 2], t[len(t) // 2 :]

    def write_vectors(self, trait: str, variant: str, metadata: VectorMetadata,
                      vectors: Mapping[int, Float[torch.Tensor, "d"]]) -> None:
        """One `layer{N}.safetensors` per layer of `vectors`, then the method's metadata (at
        `metadata.position` / `.component` / `.method`)."""
        args = (trait, variant, metadata.position, metadata.component, metadata.method)
        for layer, v in vectors.items():
            save_tensors(self.vector_path(*args, layer), {"vector": v})
        write_json(self._stage_metadata_path("vectors", *args), metadata.to_dict())

    def vector(self, trait: str, variant: str, position: str, component: str, method: str,
               layer: int) -> Float[torch.Tensor, "d"]:
        return load_tensors(self.vector_path(trait, variant, position, component, method, layer))["vector"]

    def vector_metadata(self, trait: str, variant: str, position: str, component: str, method: str) -> VectorMetadata:
        """The method's per-layer norms and thresholds and the `input_hash` of its current fit."""
        path = self._stage_metadata_path("vectors", trait, variant, position, component, method)
        return VectorMetadata.from_dict(_read(path, "vector metadata", "tracelens extract"))

    def stored_vectors(self, trait: str, variant: str, position: str, component: str) -> dict[str, list[int]]:
        """`{method: sorted layers}` of every vector file stored for the position and component."""
        root = self.vectors_root(trait, variant, position, component)
        found = {}
        for method_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            if layers := _stored_layers(method_dir):
                found[method_dir.name] = layers
        return found

    def stored_vector_sets(self, trait: str, variant: str) -> list[tuple[VectorMetadata, list[int]]]:
        """Every method's vectors of a trait, whatever the position and component: its metadata (which names
        them) and the layers whose files exist, sorted by folder."""
        root = self.extraction_dir(trait, variant) / "vectors"
        return [(VectorMetadata.from_dict(read_json(path)), _stored_layers(path.parent))
                for path in (sorted(root.glob("*/*/*/metadata.json")) if root.is_dir() else [])]

    def write_evaluation(self, trait: str, variant: str, evaluation: Evaluation) -> None:
        write_json(self.evaluation_path(trait, variant, evaluation.position, evaluation.component),
                   evaluation.to_dict())

    def evaluation(self, trait: str, variant: str, position: str, component: str) -> Evaluation:
        return Evaluation.from_dict(_read(self.evaluation_path(trait, variant, position, component), "evaluation",
                                          "tracelens extract"))

    def evaluations(self, trait: str, variant: str) -> list[Evaluation]:
        """Every stored evaluation of a trait, whatever its position and component (sorted by file)."""
        return [Evaluation.from_dict(read_json(p)) for p in self.evaluation_paths(trait, variant)]

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
            raise ConfigError(f"stage must be extraction, steering or inference; got {stage!r}")
        return self.dir / stage

    def steering_results(self, trait: str, variant: str, position: str,
                         prompt_set: str = "steering") -> SteeringResults | None:
        """The run's `results.jsonl` (a torn last line from a killed writer is dropped); None when it is
        missing or empty, DataError when it has no header."""
        lines = read_jsonl(self.steering_results_path(trait, variant, position, prompt_set))
        return SteeringResults.from_jsonl_lines(lines) if lines else None

    def all_steering_results(self, trait: str, variant: str, prompt_set: str = "steering") -> dict[str, SteeringResults]:
        """`{sanitized position: SteeringResults}` for every position of a trait that has results."""
        return {position: SteeringResults.from_jsonl_lines(read_jsonl(path))
                for position, path in self.steering_results_paths(trait, variant, prompt_set).items()}

    def append_steering(self, trait: str, variant: str, position: str,
                        line: SteeringHeader | SteeringRunRecord | Mapping[str, Any], prompt_set: str = "steering") -> None:
        """Append one line (a header, a run, or a `{"type": "baseline" | "report", ...}` object) to `results.jsonl`,
        after repairing a torn last line."""
        append_jsonl(self.steering_results_path(trait, variant, position, prompt_set),
                     line if isinstance(line, Mapping) else line.to_dict())

    def set_aside_steering_results(self, trait: str, variant: str, position: str, prompt_set: str = "steering") -> Path:
        """Rename `results.jsonl` to a new `results.stale-*.jsonl` beside it (never overwriting); returns the new path."""
        path = self.steering_results_path(trait, variant, position, prompt_set)
        aside = unique_sibling(path, "stale")
        path.rename(aside)
        return aside

    def neutral_reference(self, variant: str, max_new_tokens: int) -> NeutralReference | None:
        """The cached unsteered answers to neutral prompts, or None before the first steering run."""
        path = self.neutral_reference_path(variant, max_new_tokens)
        return NeutralReference.from_dict(read_json(path)) if path.is_file() else None

    def write_neutral_reference(self, variant: str, max_new_tokens: int, reference: NeutralReference) -> None:
        write_json(self.neutral_reference_path(variant, max_new_tokens), reference.to_dict())

    def coherence_set_path(self, variant: str, prompt_set: str, max_new_tokens: int) -> Path:
        """The model's own intact and damaged answers to ``prompt_set`` (`CoherenceSet`)."""
        return (self.dir / "steering" / "_reference" / check_name(variant, "variant")[0]
                / f"coherence-{check_name(prompt_set, 'prompt set')[0]}-{int(max_new_tokens)}.json")

    def coherence_set(self, variant: str, prompt_set: str, max_new_tokens: int) -> CoherenceSet | None:
        """The stored `CoherenceSet` of a model variant, or None before it was built."""
        path = self.coherence_set_path(variant, prompt_set, max_new_tokens)
        return CoherenceSet.from_dict(read_json(path)) if path.is_file() else None

    def write_coherence_set(self, variant: str, cset: CoherenceSet) -> None:
        write_json(self.coherence_set_path(variant, cset.prompt_set, cset.max_new_tokens), cset.to_dict())

    def traits(self, kind: str, variant: str) -> list[str]:
        """Names of the traits (sorted, "category/name") that have, for `variant`: an extraction folder
        ("extraction"), a steering folder ("steering"), an evaluation file ("evaluation"), a steering results file
        ("steering_results") or a projection file ("projections")."""
        check_name(variant, "variant")
        if kind == "projections":
            root = self.projections_dir(variant)  # projections/{trait}/{prompt set}/{id}.json
            return find_traits(root, lambda t: any((root / t).glob("*/*.json")))
        has = {"extraction": lambda t: self.extraction_dir(t, variant).is_dir(),
               "steering": lambda t: self.steering_variant_dir(t, variant).is_dir(),
               "evaluation": lambda t: bool(self.evaluation_paths(t, variant)),
               "steering_results": lambda t: bool(self.steering_results_paths(t, variant))}
        if kind not in has:
            raise ConfigError(f"kind must be one of {['projections', *has]}; got {kind!r}")
        stage = "steering" if kind.startswith("steering") else "extraction"
        return find_traits(self.stage_root(stage), has[kind])

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


    def inference_variants(self) -> list[str]:
        """The variants with an `inference/` folder, sorted."""
        root = self.stage_root("inference")
        return sorted(p.name for p in root.iterdir() if p.is_dir() and SEGMENT.match(p.name)) if root.is_dir() else []

    def prompt_sets(self, variant: str) -> list[str]:
        """The prompt sets (sorted, possibly nested "a/b") with at least one response record of `variant`."""
        root = self.inference_responses_dir(variant)
        folders = sorted(p for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
        return [f.relative_to(root).as_posix() for f in folders if any(f.glob("*.json"))]

    def prompt_ids(self, variant: str, prompt_set: str) -> list[str]:
        """The ids of the prompt set's response records: numeric ids in numeric order, then the others."""
        folder = self.inference_responses_dir(variant, prompt_set)
        if not folder.is_dir():
            raise MissingArtifactError(f"no responses for prompt set {prompt_set!r} of variant {variant!r}")
        ids = [p.stem for p in folder.glob("*.json")]
        return sorted(ids, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))

    def has_response_record(self, variant: str, prompt_set: str, prompt_id: str | int) -> bool:
        return self.inference_response_path(variant, prompt_set, prompt_id).is_file()

    def response_record(self, variant: str, prompt_set: str, prompt_id: str | int) -> ResponseRecord:
        return ResponseRecord.from_dict(_read(self.inference_response_path(variant, prompt_set, prompt_id),
                                              "response record", "tracelens monitor"))

    def write_response_record(self, variant: str, prompt_set: str, prompt_id: str | int, record: ResponseRecord) -> None:
        write_json(self.inference_response_path(variant, prompt_set, prompt_id), record.to_dict())

    def has_projection(self, variant: str, trait: str, prompt_set: str, prompt_id: str | int) -> bool:
        return self.projection_path(variant, trait, prompt_set, prompt_id).is_file()

    def projection(self, variant: str, trait: str, prompt_set: str, prompt_id: str | int) -> ProjectionRecord:
        return ProjectionRecord.from_dict(_read(self.projection_path(variant, trait, prompt_set, prompt_id),
                                                "projections", "tracelens monitor"))

    def write_projection(self, variant: str, trait: str, record: ProjectionRecord) -> None:
        """At `record.prompt_set` / `record.prompt_id`."""
        write_json(self.projection_path(variant, trait, record.prompt_set, record.prompt_id), record.to_dict())

    def massive_activations(self, variant: str, name: str = "calibration") -> dict | None:
        """A massive-dim calibration (`tracelens.model.massive`), or None when there is none yet."""
        path = self.massive_activations_path(variant, name)
        return read_json(path) if path.is_file() else None

    def write_massive_activations(self, variant: str, name: str, report: dict) -> None:
        write_json(self.massive_activations_path(variant, name), report)

    def remove_massive_activations(self, variant: str, name: str) -> None:
        self.massive_activations_path(variant, name).unlink(missing_ok=True)


def _stored_layers(method_dir: Path) -> list[int]:
    """The sorted layers of the `layer{N}.safetensors` files in one method's vectors folder."""
    return sorted(int(m[1]) for f in method_dir.iterdir() if (m := _LAYER_FILE.match(f.name)))


def _load_config(path: Path) -> dict:
    config = read_json(path, hint="")
    if not isinstance(config, dict) or not isinstance(config.get("model_variants"), dict) or not config["model_variants"]:
        raise DataError(f"{path} needs a non-empty 'model_variants' object")
    return config


def _read(path: Path, what: str, command: str) -> Any:
    """The JSON at `path`; MissingArtifactError naming the `command` that writes it when there is none."""
    if not path.is_file():
        raise MissingArtifactError(f"no {what} at {path}; run `{command}` first")
    return read_json(path)

def find_traits(root: Path, is_trait: Callable[[str], bool]) -> list[str]:
    """Names of the trait folders under `root`, sorted: the shallowest folders (of valid name parts, so never
    ``_reference``) whose name `is_trait` accepts. Traits may nest ("starter/optimism", "base/alignment/deception"),
    so `is_trait` says what a trait holds, e.g. ``lambda t: bool(exp.evaluation_paths(t, variant))``."""
    found, todo = [], [root] if root.is_dir() else []
    while todo:
        for sub in todo.pop().iterdir():
            if not (sub.is_dir() and SEGMENT.match(sub.name)):
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
        raise ConfigError(f"mode must be one of {MODES}; got {mode!r}")
    exp = Experiment.of(experiment)
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
