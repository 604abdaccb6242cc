"""Run by test_train.py under `torchrun --nproc_per_node 2`: distil a layer-pruned tiny DiT on 2 gloo processes."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from slimdiff.data import load_data
from slimdiff.models import adapter_for, build_tiny
from slimdiff.settings import KDConfig, TrainConfig
from slimdiff.training.loop import train

out, steps = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
teacher = build_tiny("tiny-dit")
student = build_tiny("tiny-dit")
student.load_state_dict(teacher.state_dict())
adapter_for(student).remove_layer("transformer_blocks.2")
data = load_data("digits", size=16)
config = TrainConfig(steps=steps, batch_size=8, checkpoint_every=2, lr=1e-3, warmup_steps=0, log_every=1)
result = train(
    student, data, out, config, teacher=teacher, kd=KDConfig(feature_weight=1.0), resume=True, progress=False
)
state = PartialState()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
(out / f"rank{state.process_index}.json").write_text(
    json.dumps(
        {"world": state.num_processes, "type": str(state.distributed_type), "digest": digest, "history": result.history}
    )
)
