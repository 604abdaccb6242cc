"""Export: save → load gives the original diffusers class with identical outputs, running in its pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiTPipeline
from helpers import FAMILIES, tiny_sd_pipeline, tiny_vae
from safetensors.torch import save_file

from slimdiff.engines import skip
from slimdiff.errors import SlimdiffError
from slimdiff.export import Provenance, load, load_architecture, read_provenance, read_spec, save
from slimdiff.models import SkippedLayer, adapter_for, build_tiny
from slimdiff.models.base import count_params
from slimdiff.models.structure import structure_of
from slimdiff.text import make_tiny_clip_text
from slimdiff.training.diffusion import make_scheduler


def _outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _hand_pruned(name: str) -> torch.nn.Module:
    """Prune channels by hand (non-uniformly) and remove one layer — the two surgeries every engine does."""
    model = build_tiny(name, **({"in_channels": 4, "out_channels": 4} if name != "tiny-unet" else {})).eval()
    adapter = adapter_for(model)
    if name == "tiny-dit":
        ff = model.transformer_blocks[1].ff.net
        keep = torch.arange(0, ff[0].proj.out_features, 3)  # inner MLP width 256 → 86
        ff[0].proj = _slice(ff[0].proj, rows=keep)
        ff[2] = _slice(ff[2], cols=keep)
    else:
        resnet = model.down_blocks[0].resnets[0]
        keep = torch.arange(0, resnet.conv1.out_channels - 8)  # 32 → 24 channels, GroupNorm(8) still divides
        resnet.conv1 = _slice(resnet.conv1, rows=keep)
        resnet.norm2 = _slice(resnet.norm2, rows=keep)
        resnet.time_emb_proj = _slice(resnet.time_emb_proj, rows=keep)
        resnet.conv2 = _slice(resnet.conv2, cols=keep)
    adapter.fix_after_surgery()
    removable = [layer.name for layer in adapter.layers() if layer.removable]
    adapter.remove_layer(removable[-1])
    return model


def _slice(module: torch.nn.Module, rows=None, cols=None) -> torch.nn.Module:
    """A copy of a Linear/Conv2d/GroupNorm keeping output channels `rows` and input channels `cols`."""
    import copy

    module = copy.deepcopy(module)
    weight = module.weight.data
    if rows is not None:
        weight = weight[rows]
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.data[rows].clone())
    if cols is not None and weight.ndim > 1:
        weight = weight[:, cols]
    module.weight = torch.nn.Parameter(weight.clone())
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, torch.nn.Conv2d):
        module.out_channels, module.in_channels = weight.shape[:2]
    elif isinstance(module, torch.nn.GroupNorm):
        module.num_channels = weight.shape[0]
    return module


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    model = build_tiny(name).eval()
    inputs = adapter_for(model).example_inputs(2)
    save(model, tmp_path / "m", provenance=Provenance(source="test", engine=None, metrics={"fid": 1.5}))
    loaded = load(tmp_path / "m")
    assert type(loaded) is type(model)
    assert torch.equal(_outputs(loaded, inputs), _outputs(model, inputs))
    assert read_provenance(tmp_path / "m").metrics == {"fid": 1.5}
    assert read_spec(tmp_path / "m")["structure"] == {}


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_and_layer_removed_model_round_trips(name: str, tmp_path: Path) -> None:
    model = _hand_pruned(name)
    inputs = adapter_for(model).example_inputs(2)
    expected = _outputs(model, inputs)
    save(model, tmp_path / "m", provenance=Provenance(source="hand", engine="manual", budget={"macs": 0.9}))
    spec = read_spec(tmp_path / "m")
    assert any("replace" in entry for entry in spec["structure"].values())
    loaded = load(tmp_path / "m")
    assert type(loaded) is type(model)
    assert structure_of(loaded) == structure_of(model)
    assert any(isinstance(m, SkippedLayer) for m in loaded.modules())
    assert torch.equal(_outputs(loaded, inputs), expected)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    meta = load_architecture(tmp_path / "m")
    assert all(p.is_meta for p in meta.parameters())
    assert [p.shape for p in meta.parameters()] == [p.shape for p in model.parameters()]


def test_unet_runs_in_ddpm_and_ddim_pipelines(tmp_path: Path) -> None:
    save(_hand_pruned("tiny-unet"), tmp_path / "m")
    unet = load(tmp_path / "m")
    for pipeline in (DDPMPipeline(unet, DDPMScheduler()), DDIMPipeline(unet, DDIMScheduler())):
        images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
        assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


def test_sd_unet_runs_in_stable_diffusion_pipeline(tmp_path: Path) -> None:
    save(_hand_pruned("tiny-sd"), tmp_path / "m")
    unet = load(tmp_path / "m")
    encoder = make_tiny_clip_text(tmp_path / "clip", hidden_size=32, max_length=16)
    pipeline = tiny_sd_pipeline(unet, encoder)
    out = pipeline(
        ["a photo of the digit 3"],
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.manual_seed(0),
    )
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def test_dit_runs_in_dit_pipeline(tmp_path: Path) -> None:
    save(_hand_pruned("tiny-dit"), tmp_path / "m")
    transformer = load(tmp_path / "m")
    pipeline = DiTPipeline(transformer=transformer, vae=tiny_vae(4), scheduler=DDIMScheduler())
    out = pipeline(
        class_labels=[1, 7], num_inference_steps=2, guidance_scale=2.0, output_type="np", generator=torch.manual_seed(0)
    )
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()


def test_pipeline_folder_loads_its_denoiser(tmp_path: Path) -> None:
    model = build_tiny("tiny-dit").eval()
    save(model, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    loaded = load(tmp_path / "pipe")
    inputs = adapter_for(model).example_inputs(1)
    assert torch.equal(_outputs(loaded, inputs), _outputs(model, inputs))


def test_plain_diffusers_directory_loads_and_unmodified_export_loads_in_diffusers(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    inputs = adapter_for(model).example_inputs(1)
    assert torch.equal(_outputs(load(tmp_path / "plain"), inputs), _outputs(model, inputs))
    save(model, tmp_path / "ours")
    from diffusers import UNet2DModel

    theirs = UNet2DModel.from_pretrained(tmp_path / "ours").eval()
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), model.state_dict().values()))
    # diffusers keeps the tensors where safetensors put them (4-byte aligned, not the allocator's 64), and MKL
    # picks its gemv kernel by alignment on some CPUs: its outputs may differ in the last bits (measured ≤ 1e-6 at
    # |output| ≈ 1 with MKL_ENABLE_INSTRUCTIONS=SSE4_2, i.e. a few float32 ulps). The weights above are exact.
    torch.testing.assert_close(_outputs(theirs, inputs), _outputs(model, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_loaded_tensors_have_the_layout_of_a_fresh_model(name: str, tmp_path: Path) -> None:
    """What makes `load`'s outputs bit-identical on every kernel path: contiguous, allocator-aligned tensors."""
    model = build_tiny(name).eval()
    save(model, tmp_path / "m")
    for tensor in load(tmp_path / "m").state_dict().values():
        assert tensor.is_contiguous() and tensor.data_ptr() % 64 == 0


def test_save_into_existing_directory_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "m" / "checkpoints").mkdir(parents=True)
    save(build_tiny("tiny-unet"), tmp_path / "m")
    assert (tmp_path / "m" / "checkpoints").is_dir()


# -- refusing bad input -----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save(build_tiny("tiny-unet"), tmp_path / "m")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SlimdiffError, match="model directory not found"):
        load(tmp_path / "nope")


def test_directory_without_model(tmp_path: Path) -> None:
    with pytest.raises(SlimdiffError, match="holds no model: expected config.json"):
        load(tmp_path)


def test_unknown_family(saved: Path) -> None:
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(SlimdiffError, match="unsupported model family 'FluxTransformer2DModel'"):
        load(saved)


def test_truncated_safetensors(saved: Path) -> None:
    weights = saved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SlimdiffError, match="corrupt or truncated"):
        load(saved)


def test_garbage_safetensors(saved: Path) -> None:
    (saved / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SlimdiffError, match="corrupt or truncated"):
        load(saved)


def test_flipped_byte_fails_checksum(saved: Path) -> None:
    weights = saved / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SlimdiffError, match="does not match its checksum"):
        load(saved)


def test_weights_of_another_model_are_refused(saved: Path, tmp_path: Path) -> None:
    other = build_tiny("tiny-unet", block_out_channels=[16, 32, 32])
    save_file(dict(other.state_dict()), tmp_path / "w.safetensors")
    spec = json.loads((saved / "slimdiff.json").read_text())
    (saved / "diffusion_pytorch_model.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes())
    spec["files"] = {}
    (saved / "slimdiff.json").write_text(json.dumps(spec))
    with pytest.raises(SlimdiffError, match=r"'conv_in.weight' has shape \(16, 1, 3, 3\) but the architecture needs"):
        load(saved)


def test_missing_tensor_is_refused(saved: Path) -> None:
    model = build_tiny("tiny-unet")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conv_out")}
    save_file(state, saved / "diffusion_pytorch_model.safetensors")
    spec = json.loads((saved / "slimdiff.json").read_text())
    spec["files"] = {}
    (saved / "slimdiff.json").write_text(json.dumps(spec))
    with pytest.raises(SlimdiffError, match=r"do not match the model's structure: missing \['conv_out.bias'"):
        load(saved)


def test_spec_with_unknown_replacement_is_refused(saved: Path) -> None:
    spec = json.loads((saved / "slimdiff.json").read_text())
    spec["structure"] = {"mid_block.resnets.0": {"replace": "os.system", "attrs": {}}}
    (saved / "slimdiff.json").write_text(json.dumps(spec))
    with pytest.raises(SlimdiffError, match="unknown type 'os.system'"):
        load(saved)


def test_newer_format_is_refused(saved: Path) -> None:
    spec = json.loads((saved / "slimdiff.json").read_text())
    (saved / "slimdiff.json").write_text(json.dumps(spec | {"format_version": 99}))
    with pytest.raises(SlimdiffError, match="newer slimdiff"):
        load(saved)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickled_weights_are_never_loaded(suffix: str, tmp_path: Path) -> None:
    model = build_tiny("tiny-unet")
    model.save_config(tmp_path)
    (tmp_path / f"diffusion_pytorch_model{suffix}").write_bytes(b"pickle would run code")
    with pytest.raises(SlimdiffError, match=r"only pickled weights \(\.bin/\.pt/\.ckpt\)") as refused:
        load(tmp_path)
    assert "\n" not in str(refused.value)


class _Crash(Exception):
    """What a kill mid-save looks like to the code after it: nothing more is written."""


@pytest.mark.parametrize("crash_at", ["weights", "spec"])
def test_a_save_interrupted_over_a_model_leaves_a_folder_load_refuses(
    crash_at: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second save into a skip model's folder dies while writing its weights, or its final spec (config, weights
    and skip table landed): loading then refuses the folder in one line — never the new weights without their
    skip table and provenance, nor the new config with the old weights, nor a half file."""
    import slimdiff.export as export

    first = build_tiny("tiny-unet").eval()
    save(first, tmp_path / "m")
    second = build_tiny("tiny-unet", block_out_channels=[16, 32, 32]).eval()
    sched = make_scheduler("ddim")
    sched.set_timesteps(4)
    units = skip.model_units(adapter_for(second), "block")
    table = skip.SkipTable.full("DDIMScheduler", sched.timesteps.tolist(), units, "block")
    if crash_at == "weights":

        def crash(tensors: dict, path: object, metadata: dict | None = None) -> None:
            Path(path).write_bytes(b"half a safetensors file")
            raise _Crash

        monkeypatch.setattr(export, "save_file", crash)
    else:
        real, specs = export.atomic_write_json, []

        def crash_on_spec(path: Path, obj: object) -> None:
            if Path(path).name == "slimdiff.json":
                specs.append(obj)
                if len(specs) == 2:  # the placeholder landed; the real spec does not
                    raise _Crash
            real(path, obj)

        monkeypatch.setattr(export, "atomic_write_json", crash_on_spec)
    with pytest.raises(_Crash):
        save(second, tmp_path / "m", artifacts={skip.ARTIFACT: table.to_json()})
    assert not list((tmp_path / "m").glob(".*.tmp"))  # no temporary file is left behind
    monkeypatch.undo()
    with pytest.raises(SlimdiffError, match="save did not finish") as refused:
        load(tmp_path / "m")
    assert "\n" not in str(refused.value)
    save(second, tmp_path / "m")  # saving again mends it
    assert count_params(load(tmp_path / "m")) == count_params(second)


def test_config_only_directory_gives_architecture(tmp_path: Path) -> None:
    build_tiny("tiny-sd").save_config(tmp_path)
    model = load_architecture(tmp_path)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_tiny("tiny-sd").parameters())


# -- broken weights: NaN or Inf -------------------------------------------------------------------------------------
def _broken(tmp_path: Path) -> Path:
    """A tiny U-Net with one NaN in `conv_in.weight` and an Inf in `time_embedding.linear_1.bias`, saved."""
    model = build_tiny("tiny-unet").eval()
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("nan")
        model.time_embedding.linear_1.bias[3] = float("inf")
    return save(model, tmp_path / "broken")


BROKEN = r"NaN or Inf in 2 of \d+ tensors, the first 'conv_in.weight' \(1 NaN, 0 Inf of \d+ values\)"


def test_nonfinite_weights_are_refused_naming_the_first_tensor_and_the_count(tmp_path: Path) -> None:
    from slimdiff.export import check_finite
    from slimdiff.jobs.info import model_info

    broken = _broken(tmp_path)
    with pytest.raises(SlimdiffError, match=BROKEN):
        load(broken)
    with pytest.raises(SlimdiffError, match=BROKEN):
        check_finite(broken)
    with pytest.raises(SlimdiffError, match=BROKEN):
        model_info(broken)
    assert load_architecture(broken) is not None  # the architecture alone reads no weights
    assert check_finite(save(build_tiny("tiny-unet"), tmp_path / "fine")) == len(build_tiny("tiny-unet").state_dict())


def test_nonfinite_weights_of_a_plain_diffusers_directory_are_refused(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("-inf"))
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    with pytest.raises(
        SlimdiffError, match=r"in 1 of \d+ tensors, the first 'conv_out.bias' \(0 NaN, 1 Inf of 1 values\)"
    ):
        load(tmp_path / "plain")


def test_huge_finite_weights_whose_sum_overflows_are_not_refused(tmp_path: Path) -> None:
    model = build_tiny("tiny-unet").eval()
    with torch.no_grad():
        model.conv_in.bias.fill_(3e38)  # the float32 sum of these overflows to Inf; every value is finite
    half = build_tiny("tiny-unet").eval().half()
    with torch.no_grad():
        half.conv_in.weight.fill_(60000.0)  # likewise in float16
    assert torch.isinf(model.conv_in.bias.sum()) and torch.isinf(half.conv_in.weight.sum())
    assert load(save(model, tmp_path / "huge")).conv_in.bias.eq(3e38).all()
    assert load(save(half, tmp_path / "half")).conv_in.weight.eq(60000.0).all()
