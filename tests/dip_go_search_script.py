"""Run by test_skip_engine.py under `torchrun --nproc_per_node 2`: one DiP-GO search on 2 gloo processes."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from slimdiff.engines import Calibration, get_engine, skip
from slimdiff.jobs.compression import training_data
from slimdiff.models import adapter_for, build_tiny
from slimdiff.training.diffusion import make_scheduler

out = Path(sys.argv[1])
torch.manual_seed(0)
model = build_tiny("tiny-unet").eval()
adapter = adapter_for(model)
sched = make_scheduler("ddim")
sched.set_timesteps(4)
base = skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), skip.model_units(adapter, "block"), "block")
costs = skip.unit_costs(model, base.units)
config = get_engine("skip").make_config(target_macs=0.5, steps=4, iterations=4, noises=4, batch_size=1)
data = Calibration(training_data(adapter, "digits", 0), lambda labels: None, {})
probs, history = skip.search(adapter, config, data, base, costs, lambda message: None)
state = PartialState()
digest = hashlib.sha256(probs.numpy().tobytes()).hexdigest()
(out / f"rank{state.process_index}.json").write_text(json.dumps({"world": state.num_processes, "digest": digest}))
