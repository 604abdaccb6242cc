"""DiP-GO's search: a gate network learns which unit to skip at which step (Zhu et al., NeurIPS 2024).

A gate network maps N×S learnable queries (units × steps) through self-attention and an MLP to keep/skip logits,
offset by a prior: the step-reuse table at the target (default) or "keep everything" (the paper's start). Gates are
hard with a straight-through gradient; the search installs its own gate hook on every unit (`Gating`): each unit
runs and returns `g·fresh + (1−g)·cache` (the cache: the table's forecast from the unit's kept steps), so the gated
trajectory from fixed noise is differentiable in the gates. Loss = 1 − SSIM (or MSE) between the final samples of
the gated and the full trajectory + α · the expected kept fraction of the sampling MACs (dead units counted as
dead), the sparsity term dropped once below the target. The denoiser is frozen.

Post-processing (`postprocess`): from the output side to the input side, skip the steps with the highest skip
probability above a threshold (0.95, lowered by 0.05 per sweep, never step 0) until the table keeps at most the
target fraction of the sampling MACs. By default the table is then compared with step reuse at the same budget
(reusing, and forecasting with the table's order) on held-out noises and the most consistent one is shipped
(`choose_table`, `fallback`). The search checkpoints and resumes (`search`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import PartialState
from accelerate.utils import reduce
from diffusers.hooks import HookRegistry, ModelHook
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten
from torchmetrics.functional.image import structural_similarity_index_measure

from slimdiff.engines.base import Calibration, Log
from slimdiff.engines.skip.baselines import baseline_table
from slimdiff.engines.skip.config import SkipConfig
from slimdiff.engines.skip.runtime import UnitHistory, attach, detach, run_state
from slimdiff.engines.skip.table import SkipTable, UnitCosts, consumers, kept_fraction
from slimdiff.errors import SlimdiffError
from slimdiff.io import atomic_dir, atomic_write_json, load_optimizer_tensors, optimizer_tensors, read_json
from slimdiff.models import Adapter, adapter_for
from slimdiff.models.base import get_submodule
from slimdiff.training.diffusion import guided, make_scheduler, null_condition

#: |keep − skip logit| the gate network starts from: keep probability 0.95 (kept) or 0.05 (reused, warm start)
KEEP_LOGIT = 3.0


class GateNetwork(nn.Module):
    """DiP-GO's gate network (the paper's "pruner"): learnable queries, one per (step, unit), through
    self-attention and an MLP head to (skip, keep) logits plus a fixed prior: ±KEEP_LOGIT from the table `start`
    (a warm start), or +KEEP_LOGIT everywhere (the paper's start: the full model)."""

    def __init__(
        self, steps: int, units: int, dim: int = 64, heads: int = 4, start: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.steps, self.units = steps, units
        self.queries = nn.Parameter(torch.randn(steps * units, dim))  # distinct from the start
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 2))
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)
        # the keep-minus-skip logit the search starts from: everything kept, or a given table (a warm start)
        prior = torch.full((steps, units), KEEP_LOGIT) if start is None else KEEP_LOGIT * (2 * start.float() - 1)
        self.register_buffer("prior", prior.flatten())

    def forward(self) -> torch.Tensor:
        """Keep probabilities, `(steps, units)`."""
        logits = self.head(self.encoder(self.queries[None]))[0]
        return torch.sigmoid(logits[:, 1] - logits[:, 0] + self.prior).view(self.steps, self.units)


def expected_kept(keep: torch.Tensor, table: SkipTable, costs: UnitCosts) -> torch.Tensor:
    """Expected kept fraction of the sampling MACs for keep probabilities `(steps, units)`; a unit runs only if it
    is kept and some consumer runs (step 0 runs everything)."""
    users = consumers(table.skip_units)
    index = {name: i for i, name in enumerate(table.units)}
    macs = torch.tensor([costs.units[n] for n in table.units], dtype=keep.dtype) / costs.total
    live: list[torch.Tensor] = [keep[1:, 0]] * len(table.units)
    for i in reversed(range(len(table.units))):
        feeds = users[table.units[i]]
        needed = 1 - torch.stack([1 - live[index[c]] for c in feeds]).prod(0) if feeds else 1.0
        live[i] = keep[1:, i] * needed
    per_step = costs.rest / costs.total + (torch.stack(live, dim=1) * macs).sum(1)
    return (1 + per_step.sum()) / keep.shape[0]


GATE_HOOK = "slimdiff_skip_gate"


class Gating:
    """The search's gate hooks on a model's units (the runtime's table hooks removed): during a gated call every
    unit computes and returns `g·fresh + (1−g)·forecast`, the forecast from its history with `table`'s forecast
    order. The gates, the call's timestep and the units' histories before the call (`cache_in`) and after it
    (`cache_out`) are passed explicitly per call, so that a checkpointed step recomputed in the backward pass sees
    its own inputs."""

    def __init__(self, model: nn.Module, table: SkipTable) -> None:
        detach(model)
        self.units, self.order = table.units, table.forecast_order
        self.gates: dict[str, torch.Tensor] | None = None  # None: outside a gated call, the units run plainly
        self.t = 0.0
        self.cache_in: dict[str, tuple[list[float], list[Any]]] = {}
        self.cache_out: dict[str, tuple[list[float], list[Any]]] = {}
        for name in table.units:
            unit = get_submodule(model, name)
            HookRegistry.check_if_exists_or_initialize(unit).register_hook(_GateHook(self, name), GATE_HOOK)

    def clear(self) -> None:
        self.gates, self.cache_in, self.cache_out = None, {}, {}


class _GateHook(ModelHook):
    """On a unit: always compute, and blend with the forecast of its history by the unit's gate."""

    def __init__(self, gating: Gating, name: str) -> None:
        super().__init__()
        self.gating, self.name = gating, name

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        gating = self.gating
        fresh = out = self.fn_ref.original_forward(*args, **kwargs)
        if gating.gates is None:
            return out
        history = UnitHistory(gating.order, *gating.cache_in.get(self.name, ((), ())))
        gate = gating.gates[self.name] if history.outputs else None
        if gate is not None:
            forecast = history.forecast(gating.t)
            out = tree_map(lambda new, cached: gate * new + (1 - gate) * cached, fresh, forecast)
        if gate is not None and gate.item() < 0.5:  # skipped: the history keeps its values, the gate's gradient
            history.outputs[0] = tree_map(
                lambda last, new, cached: last + gate * (new - cached), history.outputs[0], fresh, forecast
            )
        else:
            history.add(gating.t, out)
        gating.cache_out[self.name] = (history.timesteps, history.outputs)
        return out


def trajectory(
    adapter: Adapter,
    config: SkipConfig,
    schedule: dict[str, Any],
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    null: torch.Tensor | None,
    seed: int,
    gating: Gating | None = None,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final sample (latents, for latent models) of one sampling run from `noise` — with the model's table, if
    any, or, given `gating` (the model's gate hooks) and `gates[step, unit]`, gated; then, with
    `config.checkpointing == "steps"`, each step's activations are recomputed in the backward pass, not kept."""
    if (gating is None) != (gates is None):
        raise ValueError("a gated trajectory needs both the model's gating and the gates")
    state = run_state(adapter.model)
    sched = make_scheduler(config.scheduler, schedule)
    sched.set_timesteps(config.steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    if state is not None:
        state.reset()
    cache: dict[str, Any] = {}
    for step, t in enumerate(sched.timesteps):
        x_in, t_in = sched.scale_model_input(x, t), t.expand(x.shape[0])
        if gating is None:
            eps = guided(adapter, x_in, t_in, cond, null, config.guidance_scale)
        else:
            eps, cache = _gated_step(adapter, config, gating, x_in, t_in, cond, null, gates[step], cache)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    if gating is not None:
        gating.clear()
    if state is not None:
        state.reset()
    return x


def _gated_step(
    adapter: Adapter,
    config: SkipConfig,
    gating: Gating,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    null: torch.Tensor | None,
    gate_row: torch.Tensor,
    cache: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One gated denoiser call: ε and every unit's output (the next step's cache). The cache goes in and comes out
    as explicit tensors, so a checkpointed call recomputed in the backward pass sees exactly this step's inputs."""
    leaves, spec = tree_flatten(cache)
    out_spec: list[TreeSpec] = []

    def call(x: torch.Tensor, gate_row: torch.Tensor, *leaves: Any) -> tuple[torch.Tensor, ...]:
        gating.gates = {name: gate_row[i] for i, name in enumerate(gating.units)}
        gating.t = float(t.flatten()[0])
        gating.cache_in, gating.cache_out = tree_unflatten(list(leaves), spec), {}
        eps = guided(adapter, x, t, cond, null, config.guidance_scale)
        out_leaves, made = tree_flatten(gating.cache_out)
        out_spec[:] = [made]
        return (eps, *out_leaves)

    if config.checkpointing == "steps" and torch.is_grad_enabled():
        outputs = torch.utils.checkpoint.checkpoint(call, x, gate_row, *leaves, use_reentrant=False)
    else:
        outputs = call(x, gate_row, *leaves)
    return outputs[0], tree_unflatten(list(outputs[1:]), out_spec[0])


def postprocess(
    skip_probs: torch.Tensor, base: SkipTable, costs: UnitCosts, target: float, tolerance: float, threshold: float
) -> SkipTable:
    """DiP-GO's post-processing: from the output side to the input side, skip each unit's steps with the highest
    skip probability above the threshold (never step 0), lowering the threshold by 0.05 per sweep, until the table
    keeps at most `target × (1 + tolerance)` of the sampling MACs. A skip that would undershoot
    `target × (1 − tolerance)` is passed over (a smaller unit may land closer); only if no table lands in that band
    is the first one below taken.
    """
    table = copy.deepcopy(base)
    limit, floor = target * (1 + tolerance), target * (1 - tolerance)
    for strict in (True, False):
        sweep = threshold
        while sweep > -0.05:
            for i in reversed(range(len(table.units))):
                for step in sorted(range(1, len(table.timesteps)), key=lambda s: -float(skip_probs[s, i])):
                    if float(skip_probs[step, i]) < sweep:
                        break
                    if not table.compute[step][i]:
                        continue
                    table.compute[step][i] = False
                    kept = kept_fraction(table, costs)
                    if kept <= limit and (kept >= floor or not strict):
                        return table
                    if strict and kept < floor:
                        table.compute[step][i] = True
            sweep -= 0.05
    raise SlimdiffError(f"no table keeps as little as {limit:.3f} of the sampling MACs; raise target_macs")


@dataclass
class NoiseSet:
    """Fixed noises and conditions for search or validation, in batches, with the full sampler's final images
    (decoded by `decode` for latent models)."""

    noise: torch.Tensor
    cond: torch.Tensor | None
    null: torch.Tensor | None
    batches: list[slice]
    seed: int
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    references: dict[int, torch.Tensor] = field(default_factory=dict)

    def part(self, value: torch.Tensor | None, batch: slice) -> torch.Tensor | None:
        return None if value is None else value[batch]

    def run(
        self, adapter: Adapter, config: SkipConfig, schedule: dict[str, Any], k: int, **gating: Any
    ) -> torch.Tensor:
        """The final images of batch `k` in [-1, 1] (with the model's table, or gated: `gating`, `gates`)."""
        b = self.batches[k]
        cond, null = self.part(self.cond, b), self.part(self.null, b)
        final = trajectory(adapter, config, schedule, self.noise[b], cond, null, self.seed + k, **gating)
        return (final if self.decode is None else self.decode(final)).clamp(-1, 1)


def _batches(config: SkipConfig) -> list[slice]:
    """The search's noise batches: `noises` noises in whole batches of `batch_size`."""
    step = config.batch_size
    return [slice(i, i + step) for i in range(0, config.noises - step + 1, step)]


def _noise_set(
    adapter: Adapter, config: SkipConfig, data: Calibration, seed: int, used: Sequence[int] | None = None
) -> NoiseSet:
    """`config.noises` noises (and conditions drawn from the calibration data) from `seed`, with the references of
    the batches in `used` (default: all)."""
    generator = torch.Generator().manual_seed(seed)
    size = adapter.sample_size
    noise = torch.randn(config.noises, adapter.in_channels, size, size, generator=generator)
    cond = null = None
    if adapter.cond_kind != "none":
        picks = torch.randint(0, len(data.dataset), (config.noises,), generator=generator)
        cond = data.cond_for(torch.tensor([data.dataset[int(i)][1] for i in picks]))
        if config.guidance_scale != 1.0:
            null = null_condition(adapter, cond, data.uncond_embedding)
    noise_set = NoiseSet(noise, cond, null, _batches(config), seed, data.decode)
    with torch.no_grad():
        for k in range(len(noise_set.batches)) if used is None else used:
            noise_set.references[k] = noise_set.run(adapter, config, data.schedule, k)
    return noise_set


#: What the consistency loss of each `SkipConfig.loss` is, as the search log names it.
CONSISTENCY_NAMES = {"ssim": "1 − SSIM", "mse": "MSE"}


def _consistency(config: SkipConfig, final: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if config.loss == "ssim":
        return 1 - structural_similarity_index_measure(final, reference, data_range=2.0)
    return F.mse_loss(final, reference)


def held_out_noise_set(adapter: Adapter, config: SkipConfig, data: Calibration) -> NoiseSet:
    """Noises (and conditions) the search never sees (seed + 1), with the full sampler's final samples."""
    return _noise_set(adapter, config, data, config.seed + 1)


def held_out_consistency(
    adapter: Adapter, config: SkipConfig, data: Calibration, held_out: NoiseSet, tables: dict[str, SkipTable]
) -> dict[str, float]:
    """Each table's mean consistency loss against the full sampler on the noise set `held_out`."""
    model = copy.deepcopy(adapter.model).eval()
    skipping = adapter_for(model)
    losses = {}
    for name, table in tables.items():
        attach(model, table)
        with torch.no_grad():
            values = [
                _consistency(config, held_out.run(skipping, config, data.schedule, k), reference).item()
                for k, reference in held_out.references.items()
            ]
        losses[name] = round(sum(values) / len(values), 6)
    return losses


@dataclass
class TableChoice:
    """The table dip-go ships for one budget: the search's, or step reuse where that is more consistent with the
    full sampler on held-out noises (`held_out`: each candidate's consistency loss there)."""

    table: SkipTable
    how: str
    selected: str
    held_out: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {"selected": self.selected, "held_out": self.held_out}


def choose_table(
    adapter: Adapter,
    config: SkipConfig,
    data: Calibration,
    base: SkipTable,
    costs: UnitCosts,
    skip_probs: torch.Tensor,
    held_out: NoiseSet | None,
) -> TableChoice:
    """Post-process the search's probabilities to the budget; with `fallback` step-reuse, compare the table with
    step reuse at the same budget — reusing (`step-reuse`) and, for a forecasting table, forecasting with its order
    (`step-reuse-forecast`) — on the noise set `held_out` and keep the most consistent one (the search's on a tie)."""
    table = postprocess(skip_probs, base, costs, config.target_macs, config.tolerance, config.threshold)
    how = f"dip-go search, {config.iterations} iterations"
    if config.fallback == "none" or held_out is None:
        return TableChoice(table, how, "dip-go", {})
    try:
        reuse, reuse_how = baseline_table(adapter, dataclasses.replace(config, method="step-reuse"), base, costs)
    except SlimdiffError:  # step reuse cannot keep this little: nothing to compare with
        return TableChoice(table, how, "dip-go", {})
    candidates = {"dip-go": table, "step-reuse": dataclasses.replace(reuse, forecast_order=0)}
    if reuse.forecast_order:
        candidates["step-reuse-forecast"] = reuse
    first = {}  # one held-out run per distinct table (the search may end where it started)
    for name, candidate in candidates.items():
        first.setdefault(json.dumps(candidate.to_json()), name)
    scored = held_out_consistency(adapter, config, data, held_out, {name: candidates[name] for name in first.values()})
    losses = {name: scored[first[json.dumps(candidate.to_json())]] for name, candidate in candidates.items()}
    best = min(losses, key=losses.__getitem__)
    if best == "dip-go":
        return TableChoice(table, how, "dip-go", losses)
    order = candidates[best].forecast_order
    why = "more consistent on held-out noises than the dip-go search's table"
    why += f" ({losses[best]:.4f} vs {losses['dip-go']:.4f})"
    return TableChoice(candidates[best], f"step reuse (forecast order {order}), {reuse_how}: {why}", best, losses)


#: The search writes a resumable checkpoint every this many optimizer steps (where the calibration allows).
SEARCH_CHECKPOINT_EVERY = 10
SEARCH_STATE = "dip-go-search"
NETWORK_FILE = "gate_network.safetensors"


def _search_settings(config: SkipConfig, base: SkipTable, start: SkipTable | None, processes: int) -> dict[str, Any]:
    """Everything a search's trajectory depends on: a checkpoint made with other settings is not resumed."""
    settings = {
        "config": dataclasses.asdict(config),
        "units": base.units,
        "timesteps": base.timesteps,
        "start": None if start is None else start.compute,
        "processes": processes,
    }
    return json.loads(json.dumps(settings))


def _save_search(
    folder: Path,
    done: int,
    network: GateNetwork,
    optimizer: torch.optim.Optimizer,
    cosine: Any,
    history: list,
    settings: dict,
) -> None:
    tensors, param_groups = optimizer_tensors(optimizer)
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp / NETWORK_FILE)
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"done": done, "history": history, "lr_scheduler": cosine.state_dict(), "settings": settings}
        atomic_write_json(tmp / "state.json", state | {"param_groups": param_groups})


def _resume_search(
    folder: Path, network: GateNetwork, optimizer: torch.optim.Optimizer, cosine: Any, settings: dict, log: Log
) -> tuple[int, list[dict[str, float]]]:
    """The optimizer steps done and the history of a checkpointed search with the same settings (else 0, [])."""
    if not (folder / "state.json").is_file():
        return 0, []
    state = read_json(folder / "state.json", "search checkpoint")
    if state.get("settings") != settings:
        log(f"{folder}: a search with other settings; starting over")
        return 0, []
    network.load_state_dict(load_file(folder / NETWORK_FILE))
    load_optimizer_tensors(optimizer, load_file(folder / "optimizer.safetensors"), state["param_groups"])
    cosine.load_state_dict(state["lr_scheduler"])
    log(f"resuming the dip-go search after {state['done']} of {settings['config']['iterations']} steps")
    return state["done"], state["history"]


def search(
    adapter: Adapter,
    config: SkipConfig,
    data: Calibration,
    base: SkipTable,
    costs: UnitCosts,
    log: Log,
    start: SkipTable | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train the gate network on the gated vs full trajectories, from everything kept or from the table `start`; returns
    the skip probabilities `(steps, units)`.

    Under `accelerate launch` each process runs its own noise batches and the network's gradients are averaged, so
    every process holds the same network. With `data.work_dir` set, the search checkpoints there (network, Adam and
    schedule state; safetensors + JSON, atomically) and an interrupted search with the same settings resumes.
    """
    processes = PartialState(cpu=not torch.cuda.is_available())  # as training: gloo processes on CPU machines
    rank, world = processes.process_index, processes.num_processes
    torch.manual_seed(config.seed)
    count = len(_batches(config))
    used = sorted({(it * world + rank) % count for it in range(min(config.iterations, count))})
    noise_set = _noise_set(adapter, config, data, config.seed, used)
    model = copy.deepcopy(adapter.model).eval().requires_grad_(False)
    gating = Gating(model, base)
    gated = adapter_for(model)
    network = GateNetwork(
        len(base.timesteps), len(base.units), start=None if start is None else torch.tensor(start.compute)
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations)
    settings = _search_settings(config, base, start, world)
    folder = None if data.work_dir is None else data.work_dir / SEARCH_STATE
    done, history = (0, []) if folder is None else _resume_search(folder, network, optimizer, cosine, settings, log)
    for it in range(done, config.iterations):
        k = (it * world + rank) % count
        keep = network()
        hard = (keep > 0.5).to(keep.dtype)
        gates = hard + keep - keep.detach()  # straight-through: hard forward, soft gradient
        gates = torch.cat([torch.ones_like(gates[:1]), gates[1:]])
        final = noise_set.run(gated, config, data.schedule, k, gating=gating, gates=gates)
        consistency = _consistency(config, final, noise_set.references[k])
        expected = expected_kept(keep, base, costs)
        loss = consistency + (config.alpha * expected if expected.item() > config.target_macs else 0.0)
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            for parameter in network.parameters():
                parameter.grad = reduce(parameter.grad, "mean")
            consistency = reduce(consistency.detach(), "mean")
        optimizer.step()
        cosine.step()
        if it % 10 == 0 or it == config.iterations - 1:
            row = {
                "iteration": it,
                "consistency": consistency.detach().item(),
                "expected_kept": expected.detach().item(),
                "hard_skipped": int((hard[1:] == 0).sum()),
            }
            history.append(row)
            log(
                f"search {it:4d}: consistency loss {row['consistency']:.4f} ({CONSISTENCY_NAMES[config.loss]} to the "
                f"full sampler's samples), expected {row['expected_kept']:.3f} of the sampling MACs kept"
            )
        if folder is not None and (it + 1) % SEARCH_CHECKPOINT_EVERY == 0 and processes.is_main_process:
            _save_search(folder, it + 1, network, optimizer, cosine, history, settings)
    with torch.no_grad():
        skip_probs = 1 - network()
    return skip_probs, history
