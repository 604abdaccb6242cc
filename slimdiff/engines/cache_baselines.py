"""diffusers' own cache hooks (FirstBlockCache, TaylorSeer, MagCache, Pyramid Attention Broadcast, FasterCache) as
baselines for skip tables: applied to a model as diffusers ships them, run under a sampling loop that provides the
cache context they need, with the MACs they actually computed counted.

Not an engine (it makes no artifact): the benchmark uses it to put each hook beside the skip tables at equal
sampling MACs. diffusers' hooks expect a pipeline to wrap every denoiser call in `model.cache_context(name)`
(`CacheMixin`), which `UNet2DModel`, `UNet2DConditionModel` and `DiTTransformer2DModel` lack; `attached` puts a
hook on the model itself that sets that context (and the current timestep, for the hooks that read it) around each
call and resets the hooks' state at the start of every sampling run of `steps` calls.

**Counting.** `MacMeter` puts forward pre-hooks on every module and charges a module's MACs (from one meta-device
trace, `slimdiff.metrics.cost.macs_by_module`, per sample × the call's batch) only when its forward really runs:
a leaf when it is called, the work a module does itself (attention's QK^T/AV products) when its first child is
called. A skipped block never calls its children, so it costs nothing; a hook that silently computes everything
is counted at full cost.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from slimdiff.errors import SlimdiffError
from slimdiff.metrics.cost import count_macs, macs_by_module

_CONTEXT_HOOK = "slimdiff_cache_context"


@dataclass(frozen=True)
class HookKind:
    """One diffusers cache hook: its knob (searched by `tune`) and the knob's range, cheapest end last."""

    name: str
    knob: str
    low: float
    high: float
    integer: bool
    description: str


HOOKS: dict[str, HookKind] = {
    kind.name: kind
    for kind in (
        HookKind("first-block", "threshold", 1e-3, 4.0, False, "FirstBlockCache (skip the tail blocks)"),
        HookKind("taylorseer", "cache_interval", 1, 12, True, "TaylorSeer, default module patterns"),
        HookKind("taylorseer-modules", "cache_interval", 1, 12, True, "TaylorSeer on every attention and MLP"),
        HookKind("magcache", "threshold", 1e-3, 4.0, False, "MagCache (calibrated on the model)"),
        HookKind("pab", "spatial_attention_block_skip_range", 1, 12, True, "Pyramid Attention Broadcast"),
        HookKind("fastercache", "spatial_attention_block_skip_range", 1, 12, True, "FasterCache"),
    )
}


def hook_kind(name: str) -> HookKind:
    """The hook called `name`, or one line naming the valid ones."""
    if name not in HOOKS:
        raise SlimdiffError(f"unknown cache hook '{name}'; valid: {', '.join(HOOKS)}")
    return HOOKS[name]


def block_list(model: nn.Module) -> str | None:
    """The name of the model's transformer block list as FirstBlockCache / MagCache find it, or None."""
    for name, child in model.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList) and len(child) > 1:
            return name
    return None


class MacMeter:
    """Counts the MACs a model's forwards actually run (per sample × batch), against a full call's MACs."""

    def __init__(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        own = _own_macs_per_entry(model, modules)
        self.full_per_sample = count_macs(model).total
        self._charges: dict[str, int] = {}  # MACs charged when the module's forward is entered
        self._own: dict[str, int] = {}  # MACs a module does itself, charged when its first child is entered
        self._parent: dict[str, str] = {}
        for name, module in modules.items():
            children = _called_children(name, module)
            if not children:
                self._charges[name] = own[name]
            elif own[name] > 0:
                self._own[name] = own[name]
                for child in children:
                    self._parent[child] = name
        self._pending: set[str] = set()
        self.computed = 0
        self.full = 0
        self._handles = [
            module.register_forward_pre_hook(self._entered(name), with_kwargs=True)
            for name, module in modules.items()
            if name in self._charges or name in self._own or name in self._parent or name == ""
        ]

    def _entered(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            batch = _batch_size(args, kwargs)
            if name == "":
                self.full += self.full_per_sample * batch
            parent = self._parent.get(name)
            if parent in self._pending:
                self._pending.discard(parent)
                self.computed += self._own[parent] * batch
            if name in self._own:
                self._pending.add(name)
            self.computed += self._charges.get(name, 0) * batch

        return hook

    @property
    def fraction(self) -> float:
        """The share of the calls' full MACs that ran (1.0 before any call)."""
        return self.computed / self.full if self.full else 1.0

    def reset(self) -> None:
        self.computed = self.full = 0
        self._pending.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _own_macs_per_entry(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, int]:
    """The MACs each module runs itself (all of a leaf's; a parent's outside its children, e.g. attention's
    products) per entry at batch 1: traced over one meta-device call, divided by the times the trace entered it
    (DiT's output layer calls block 0's embedder a second time)."""
    entries = dict.fromkeys(modules, 0)

    def counter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            entries[name] += 1

        return hook

    handles = [module.register_forward_pre_hook(counter(name)) for name, module in modules.items()]
    try:
        traced = macs_by_module(model, [name for name in modules if name])  # every entry, all descendants
    finally:
        for handle in handles:
            handle.remove()
    total = count_macs(model).total
    own = {}
    for name, module in modules.items():
        children = _called_children(name, module)
        if not children:
            own[name] = traced.get(name, 0)
        elif name:  # a module entered from elsewhere (block 0's embedder) makes this negative for its parent
            own[name] = max(0, traced.get(name, 0) - sum(traced.get(child, 0) for child in children))
    own[""] = total - sum(own.values())
    return {name: macs // max(1, entries[name]) for name, macs in own.items()}


def _called_children(name: str, module: nn.Module) -> list[str]:
    """The submodules `module`'s forward calls directly: its children, containers (ModuleList/Dict) opened."""
    out = []
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            out += _called_children(full, child)
        else:
            out.append(full)
    return out


def _batch_size(args: tuple, kwargs: dict) -> int:
    tensor = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim > 0), None)
    return 1 if tensor is None else int(tensor.shape[0])


class _ContextHook(ModelHook):
    """On the model itself: sets diffusers' cache context around each call, remembers the call's timestep, and
    resets every stateful hook at the start of each sampling run (every `steps` calls)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.calls = 0
        self.timestep = 0.0

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        step = self.calls % self.steps
        if step == 0:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        context = CacheContext("cond", step_index=step, num_inference_steps=self.steps, timestep=self.timestep)
        _set_cache_context(module, context)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _set_cache_context(module, None)
            self.calls += 1


@dataclass
class Attached:
    """A cache hook on a model: `meter` counts what ran; `reset()` starts a new sampling run and a new count."""

    model: nn.Module
    kind: HookKind
    value: float
    meter: MacMeter
    context: _ContextHook
    config: Any = field(repr=False)

    def reset(self) -> None:
        self.context.calls = 0
        self.meter.reset()


def make_config(kind: HookKind, value: float, steps: int, timestep: Callable[[], float], model: nn.Module) -> Any:
    """diffusers' config for hook `kind` at knob `value` (the other settings at diffusers' defaults, except where
    the tiny models need otherwise: TaylorSeer's factors in float32, MagCache allowed to skip any number of steps
    and calibrated here, PAB skipping at every timestep; FasterCache as guidance-distilled (attention caching only:
    its unconditional-batch reuse splits `hidden_states` but not `class_labels`) with its default timestep range —
    widening it makes its first call skip with an empty cache)."""
    if kind.name == "first-block":
        return FirstBlockCacheConfig(threshold=value)
    if kind.name in ("taylorseer", "taylorseer-modules"):
        modules = attention_and_mlp_patterns(model) if kind.name == "taylorseer-modules" else None
        return TaylorSeerCacheConfig(
            cache_interval=int(value), taylor_factors_dtype=torch.float32, cache_identifiers=modules
        )
    if kind.name == "magcache":
        return MagCacheConfig(threshold=value, max_skip_steps=steps, num_inference_steps=steps, mag_ratios=[1.0])
    if kind.name == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(value),
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        )
    return FasterCacheConfig(
        spatial_attention_block_skip_range=int(value),
        tensor_format="BCHW",
        is_guidance_distilled=True,
        current_timestep_callback=timestep,
        attention_weight_callback=lambda _: 0.5,
    )


def attention_and_mlp_patterns(model: nn.Module) -> list[str]:
    """Exact-name patterns for every attention and feed-forward module of `model` (TaylorSeer's default patterns
    end in `attn`, which names none of DiT's `attn1` nor any module of a U-Net)."""
    classes = (Attention, FeedForward)
    return [re.escape(name) for name, module in model.named_modules() if isinstance(module, classes)]


_APPLY = {
    "first-block": apply_first_block_cache,
    "taylorseer": apply_taylorseer_cache,
    "taylorseer-modules": apply_taylorseer_cache,
    "magcache": apply_mag_cache,
    "pab": apply_pyramid_attention_broadcast,
    "fastercache": apply_faster_cache,
}


def refusal(model: nn.Module, name: str) -> str | None:
    """Why diffusers' hook `name` cannot run on `model` at all, or None where it can be applied."""
    kind = hook_kind(name)
    if kind.name in ("first-block", "magcache") and block_list(model) is None:
        names = ", ".join(sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS))
        return (
            f"{type(model).__name__} has no transformer block list among its children (a ModuleList named one of "
            f"{names}); {kind.description} hooks only such a list"
        )
    return None


@contextlib.contextmanager
def attached(
    model: nn.Module, name: str, value: float, *, steps: int, calibrate: Callable[[], None] | None = None
) -> Iterator[Attached]:
    """Apply diffusers' hook `name` at knob `value` to `model` for the block, with the cache context provided and
    the MACs counted; the model is bare again afterwards. MagCache needs `calibrate` (one sampling run of `steps`
    calls): its ratios come from diffusers' own calibration mode on this model."""
    kind = hook_kind(name)
    reason = refusal(model, name)
    if reason is not None:
        raise SlimdiffError(f"{kind.description} refuses this model: {reason}")
    if steps < 1:
        raise SlimdiffError(f"steps must be ≥ 1 (got {steps})")
    if kind.integer and value < 1:
        raise SlimdiffError(f"{kind.knob} must be ≥ 1 (got {value})")
    meter = MacMeter(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    context = _ContextHook(steps)
    try:
        config = make_config(kind, value, steps, lambda: context.timestep, model)
        if kind.name == "magcache":
            config.mag_ratios = torch.tensor(_mag_ratios(model, steps, calibrate))
        _APPLY[kind.name](model, config)
        registry.register_hook(context, _CONTEXT_HOOK)
        registry.invalidate_child_registries_cache()
        meter.reset()  # MagCache's calibration run is not the hook's cost
        yield Attached(model, kind, value, meter, context, config)
    finally:
        meter.remove()
        _remove_all_hooks(model)


def _mag_ratios(model: nn.Module, steps: int, calibrate: Callable[[], None] | None) -> list[float]:
    """MagCache's per-step residual magnitude ratios for this model, from diffusers' calibration mode (which prints
    them at the end of a run of `steps` calls)."""
    if calibrate is None:
        raise SlimdiffError("MagCache needs a calibration run: pass calibrate= (one sampling run)")
    registry = HookRegistry.check_if_exists_or_initialize(model)
    context = _ContextHook(steps)
    printed = io.StringIO()
    try:
        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=steps))
        registry.register_hook(context, _CONTEXT_HOOK)
        registry.invalidate_child_registries_cache()
        with contextlib.redirect_stdout(printed):
            calibrate()
    finally:
        _remove_all_hooks(model)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("[") and "]" == line[-1]]
    if not lines:
        raise SlimdiffError(f"MagCache calibration printed no ratios (is the sampling run {steps} steps?)")
    return [float(r) if math.isfinite(r) else 1.0 for r in ast.literal_eval(lines[0])]


def _remove_all_hooks(model: nn.Module) -> None:
    """Remove every diffusers hook from the model and its submodules."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name in reversed(registry._hook_order):  # last registered first: each restores the one before
            registry.remove_hook(hook_name, recurse=False)
        del module._diffusers_hook
        vars(module).pop("forward", None)  # the bound method the first hook wrapped, set back as an attribute


@dataclass(frozen=True)
class Tuned:
    """The knob value `tune` chose, its counted fraction, and every (value, fraction) it tried."""

    hook: str
    value: float
    fraction: float
    trials: list[tuple[float, float]]
    reached: bool


def tune(
    model: nn.Module,
    name: str,
    target: float,
    *,
    steps: int,
    run: Callable[[], None],
    trials: int = 8,
    tolerance: float = 0.03,
) -> Tuned:
    """Search hook `name`'s knob for the setting whose counted MACs are closest to `target` of the full run without
    exceeding target × (1 + tolerance): bisection (log scale for thresholds) over `trials` runs of `run()` (one
    sampling run of `steps` calls). `reached` is False where no tried setting got down to the target — the best
    row then is the cheapest setting found."""
    if not 0 < target <= 1:
        raise SlimdiffError(f"target must lie in (0, 1] (got {target})")
    kind = hook_kind(name)
    low, high = kind.low, min(kind.high, steps) if kind.integer else kind.high
    tried: dict[float, float] = {}

    def measure(value: float) -> float:
        if value not in tried:
            with attached(model, name, value, steps=steps, calibrate=run) as hooked:
                run()
                tried[value] = hooked.meter.fraction
        return tried[value]

    measure(high)
    for _ in range(trials - 1):
        if kind.integer and high - low <= 1:
            break
        middle = (low + high) // 2 if kind.integer else math.sqrt(low * high)
        if measure(middle) > target * (1 + tolerance):
            low = middle
        else:
            high = middle
    fitting = {v: f for v, f in tried.items() if f <= target * (1 + tolerance)}
    pool = fitting or tried
    value = max(pool, key=pool.get) if fitting else min(pool, key=pool.get)
    return Tuned(name, value, pool[value], sorted(tried.items()), bool(fitting))
