"""The decode fast path: the parts of a forward pass no hook can observe run as the plain HF modules.

TransformerLens 4.3 wraps the HF model in place: every embedding, block, norm, projection and head of the
HF tree is replaced by a bridge component that fires `hook_in`/`hook_out` HookPoints (about 40 per Llama
block) around the original module, checks accelerate's offloading on every call and runs TL's own norm
and attention code. With no hook registered, that work changes no tensor (the parity suite:
`tests/test_parity.py`), and it is most of the bridge's per-step cost in generation (docs/performance.md,
"Decode step profile").

`fast_path(model)` is a context manager around one forward call of `model.original_model`. On entry it
puts, for every top-level bridge component (a *unit*: the embedding, each block, the final norm, the
rotary embedding, the unembedding) whose bridge subtree has no hook anywhere, the original HF module back
in its HF parent, with every bridge nested inside it unwrapped too, so that unit runs exactly the HF code.
A block whose only hooked points are its own `hook_in`/`hook_out` (`hook_resid_pre`/`hook_resid_post`,
tracelens' "residual" site) keeps its bridge, which fires those two, around the plain HF layer. Any other
hooked unit runs its whole bridge, as without the fast path. On exit the bridges go back, also when the
forward raises. So a registered hook fires with the same tensor, and the output is the same to the bit
(`tests/test_fastpath.py` on every tested architecture, eager and SDPA).

"Hooked" means a torch hook (forward, pre-forward, backward) on any HookPoint of the unit, or a torch hook
on one of its bridge modules other than TransformerLens' own wiring. With a global torch module hook, or a
bridge in compatibility mode (processed weights), nothing is unwrapped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torch.nn.modules import module as torch_module
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.block import BlockBridge

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


@dataclass
class _Swap:
    """Bridges held by one HF parent (its `_modules`): `bridges[name]` normally, `originals[name]` while unwrapped."""

    parent: dict[str, nn.Module]
    bridges: dict[str, GeneralizedComponent]
    originals: dict[str, nn.Module]

    def unwrap(self) -> None:
        self.parent.update(self.originals)

    def rewrap(self) -> None:
        self.parent.update(self.bridges)


class _Unit:
    """A top-level bridge component: its own swap, the swaps of the bridges nested in its HF module, and the
    hook dictionaries of its subtree, listed once so that checking them per call costs no Python call per module."""

    def __init__(self, bridge: GeneralizedComponent, swap: _Swap, nested: list[_Swap]) -> None:
        self.bridge, self.swap, self.nested = bridge, swap, nested
        # A plain BlockBridge fires only its own hook_in/hook_out around the HF layer; hooked alone, those two
        # keep the block's bridge while everything nested in it runs as HF code ("shallow").
        own = ((bridge.hook_in, bridge.hook_out)
               if isinstance(bridge, BlockBridge) and type(bridge).forward is BlockBridge.forward else ())
        points = [m for m in bridge.modules() if isinstance(m, HookPoint)]
        self.own_dicts = [d for hp in own for d in _hook_dicts(hp)]
        self.deep_dicts = [d for hp in points if not any(hp is o for o in own) for d in _hook_dicts(hp)]
        self.bridge_dicts = [d for m in bridge.modules() if isinstance(m, GeneralizedComponent) for d in _hook_dicts(m)]

    def mode(self) -> str:
        """"plain" (unwrap everything), "shallow" (keep the unit's bridge, unwrap the nested ones) or "bridge"."""
        if any(self.deep_dicts) or (any(self.bridge_dicts) and self._user_hooked()):
            return "bridge"
        return "shallow" if any(self.own_dicts) else "plain"

    def _user_hooked(self) -> bool:
        """A torch hook on a bridge module that TransformerLens did not install itself (a block's capture wiring)."""
        internal = {h.id for h in getattr(self.bridge, "_capture_hook_handles", ())}
        return any(key not in internal for d in self.bridge_dicts for key in d)


def _hook_dicts(module: nn.Module) -> tuple[dict, ...]:
    """The dictionaries torch keeps a module's hooks in (each stays the same object for the module's life)."""
    return module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks


def _nested_swaps(module: nn.Module) -> list[_Swap]:
    """The bridges reachable from `module` through the HF tree (what an HF forward calls), one `_Swap` per HF
    parent; `_NoOriginal` when one has no HF module."""
    swaps, found = [], {}
    for name, child in module._modules.items():
        if isinstance(child, GeneralizedComponent):
            found[name] = child
            swaps += _nested_swaps(_original(child))
        elif child is not None:
            swaps += _nested_swaps(child)
    if found:
        swaps.insert(0, _Swap(module._modules, found, {n: _original(b) for n, b in found.items()}))
    return swaps


def _original(bridge: GeneralizedComponent) -> nn.Module:
    if bridge.original_component is None:
        raise _NoOriginal(bridge)
    return bridge.original_component


class _NoOriginal(Exception):
    """A bridge without an HF module to fall back to (a symbolic placeholder): its unit always runs bridged."""


def _units(module: nn.Module) -> list[_Unit]:
    """The top-level bridges under `module` in the HF tree, as units (those without an HF module left out)."""
    units = []
    for name, child in module._modules.items():
        if isinstance(child, GeneralizedComponent):
            try:
                own = _Swap(module._modules, {name: child}, {name: _original(child)})
                units.append(_Unit(child, own, _nested_swaps(own.originals[name])))
            except _NoOriginal:
                continue
        elif child is not None:
            units += _units(child)
    return units


def _model_units(model) -> list[_Unit]:
    """The units of `model.original_model`, found once per model (its module tree is fixed after loading) and
    kept on the model, so they live as long as it does."""
    found = model.__dict__.get("_tracelens_fast_path_units")
    if found is None or found[0] is not model.original_model:
        found = (model.original_model, _units(model.original_model))
        object.__setattr__(model, "_tracelens_fast_path_units", found)
    return found[1]


@contextlib.contextmanager
def fast_path(model) -> Iterator[int]:
    """Run the unhooked units of `model` (a tracelens `TransformerBridge`) as plain HF modules inside the block
    (module docstring); yields how many units run without their bridge. Not reentrant and not thread-safe:
    one forward call of `model.original_model` at a time, as TransformerLens' hooks already require."""
    if getattr(model, "compatibility_mode", False) or any(getattr(torch_module, g) for g in _GLOBAL_HOOKS):
        yield 0
        return
    todo: list[_Swap] = []
    plain = 0
    for unit in _model_units(model):
        mode = unit.mode()
        if mode != "bridge":
            plain += mode == "plain"
            todo += [unit.swap, *unit.nested] if mode == "plain" else unit.nested
    done: list[_Swap] = []
    try:
        for swap in todo:
            swap.unwrap()
            done.append(swap)
        yield plain
    finally:
        for swap in reversed(done):
            swap.rewrap()
