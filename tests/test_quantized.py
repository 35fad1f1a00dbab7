"""8-bit weights: the kernels, quantizing while loading, `quantize` checkpoints and their strict check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engines import load_tiny
from safetensors.torch import load_file, save_file

from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.errors import CheckpointError
from misotts_agents.model.prequantize import quantize_checkpoint
from misotts_agents.model.quantized import linear, quantize_rows
from misotts_agents.model.tensorfile import TensorFile, write_tensorfile
from misotts_agents.model.weights import load_model
from misotts_agents.testing.fidelity import relative_error, teacher_forced, topk_agreement
from misotts_agents.testing.random_weights import random_model_on
from misotts_agents.testing.tiny import TINY_CONFIG

# The documented bound (README, "8-bit weights"): int8 logits within 3% (relative, Frobenius) of
# fp32 on the tiny checkpoint, over 200 teacher-forced frames (measured: ~0.3% and ~1.1%).
INT8_LOGIT_BOUND = 0.03
REQUEST = SynthesisRequest("Eight bits.", seed=11, max_audio_ms=80 * 6)


@pytest.fixture(scope="module")
def int8_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_checkpoint(tiny_dir, tmp_path_factory.mktemp("int8"), "int8", progress=False)


def test_rows_are_scaled_per_output_channel():
    w = torch.randn(6, 64)
    w[2] *= 100  # an outlier row costs only itself its resolution
    q, scale = quantize_rows(w, "int8")
    assert q.dtype == torch.int8
    assert scale.shape == (6,)
    assert (q.abs().amax(dim=1) == 127).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    q8, scale8 = quantize_rows(w, "fp8")
    assert q8.dtype == torch.float8_e4m3fn
    assert relative_error(q8.float() * scale8[:, None], w) < 0.05


def test_int8_linear_is_the_dequantized_product():
    q, scale = quantize_rows(torch.randn(48, 64), "int8")
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(linear(x, q, scale), F.linear(x, q.float() * scale[:, None]), rtol=1e-5, atol=1e-5)


def test_fp8_linear_math_on_cpu():
    """The fp8 product (activations quantized per row, _scaled_mm): the engine runs it on CUDA only,
    but the arithmetic is checked here wherever this torch has a CPU _scaled_mm."""
    q, scale = quantize_rows(torch.randn(48, 64), "fp8")
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    try:
        got = linear(x, q, scale)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"no CPU _scaled_mm in this torch: {exc}")
    assert got.dtype == torch.bfloat16
    assert got.shape == (7, 48)
    assert relative_error(got, F.linear(x.float(), q.float() * scale[:, None])) < 0.08


def test_tensorfile_streams_writes_and_reads_row_blocks(tmp_path):
    a, b = torch.arange(12.0).view(4, 3), torch.tensor([1, -2], dtype=torch.int8)
    path = tmp_path / "t.safetensors"
    write_tensorfile(path, {"a": (torch.float32, (4, 3)), "b": (torch.int8, (2,))}, iter([("a", a), ("b", b)]))
    assert load_file(path)["b"].tolist() == [1, -2]  # the reference reader agrees
    with TensorFile(path) as f:
        block = torch.empty(2, 3)
        f.read_into("a", block, first_row=1)
        assert block.equal(a[1:3])
        with pytest.raises(ValueError, match="does not match"):
            f.read_into("a", torch.empty(2, 3), first_row=3)
    with pytest.raises(ValueError, match="not the next entry"):
        write_tensorfile(path, {"a": (torch.float32, (4, 3))}, iter([("b", b)]))


def test_int8_logits_stay_within_the_documented_bound(tiny_dir):
    codes = torch.randint(0, 2048, (200, 32), generator=torch.Generator().manual_seed(0))
    path = tiny_dir / "model.safetensors"
    reference = teacher_forced(load_model(path, TINY_CONFIG, progress=False), codes)
    model = load_model(path, TINY_CONFIG, progress=False, weights="int8")
    assert model.backbone.layers[0].attn.wqkv.dtype == torch.int8  # type: ignore[union-attr]
    ours = teacher_forced(model, codes)
    assert relative_error(ours.c0_logits, reference.c0_logits) < INT8_LOGIT_BOUND
    assert relative_error(ours.depth_logits, reference.depth_logits) < INT8_LOGIT_BOUND
    assert topk_agreement(ours.depth_logits, reference.depth_logits, 1) > 0.9


def test_quantized_checkpoint_round_trips(tiny_dir, int8_dir):
    """Written by `quantize`, read strictly without the fp32 file: the same model, the same codes."""
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["quantization"]["weights"] == "int8"
    assert {p.name for p in tiny_dir.iterdir()} == {p.name for p in int8_dir.iterdir()}  # tokenizer, Mimi...
    with TensorFile(int8_dir / "model.safetensors") as f:
        assert f.tensors["backbone.layers.0.mlp.w1.weight"].dtype == torch.int8
        assert f.tensors["text_embeddings.weight"].dtype == torch.bfloat16
    at_load = load_model(tiny_dir / "model.safetensors", TINY_CONFIG, progress=False, weights="int8")
    stored = load_model(int8_dir / "model.safetensors", TINY_CONFIG, progress=False, weights="int8", stored="int8")
    for (key, a), (_, b) in zip(at_load.state_dict().items(), stored.state_dict().items(), strict=True):
        assert a.dtype == b.dtype, key
        assert a.equal(b), key
    with load_tiny(tiny_dir, weights="int8", max_batch=1) as quantizing, load_tiny(int8_dir, weights="int8") as read:
        assert (quantizing.synthesize(REQUEST).codes == read.synthesize(REQUEST).codes).all()


def _corrupt(int8_dir: Path, tmp_path: Path, change) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(int8_dir, broken)
    state = load_file(broken / "model.safetensors")
    change(state)
    save_file(state, broken / "model.safetensors")
    return broken


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("decoder.layers.0.mlp.w2.weight_scale"), "missing keys: decoder.layers.0.mlp.w2.weight_scale"),
        (
            lambda s: s.update({"backbone.layers.0.attn.q_proj.weight": torch.zeros(64, 64)}),
            "backbone.layers.0.attn.q_proj.weight has dtype torch.float32, expected torch.int8",
        ),
        (
            lambda s: s.update({"backbone.layers.0.mlp.w1.weight_scale": torch.ones(3)}),
            r"backbone.layers.0.mlp.w1.weight_scale has shape \(3,\)",
        ),
        (lambda s: s.update({"extra.weight_scale": torch.ones(3)}), "unexpected keys: extra.weight_scale"),
    ],
)
def test_a_corrupt_quantized_checkpoint_is_a_clear_error(int8_dir, tmp_path, change, message):
    broken = _corrupt(int8_dir, tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_tiny(broken, weights="int8")


def test_mismatched_formats_are_clear_errors(tiny_dir, int8_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"holds int8 weights .* load it with weights='int8'"):
        load_tiny(int8_dir)  # bf16 asked of an int8 checkpoint
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(int8_dir, tmp_path / "again", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(int8_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "quantization": {"weights": "int4"}}))
    with pytest.raises(CheckpointError, match="bad 'quantization' entry"):
        load_tiny(bad, weights="int8")
    with pytest.raises(ValueError, match="weights must be one of bf16, int8, fp8"):
        load_tiny(tiny_dir, weights="int4")  # type: ignore[arg-type]


def test_fp8_on_cpu_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match=r"weights='fp8' needs a CUDA GPU of compute capability >= 8\.9"):
        load_tiny(tiny_dir, weights="fp8")


def test_int8_layer_compiles_as_one_graph():
    """The frame step compiles each layer (dynamic shapes) before capturing CUDA graphs: an int8
    layer must trace without a graph break and compute what it computes eagerly (~20 s on 2 cores)."""
    from misotts_agents.model.transformer import CacheWindow

    model = random_model_on(TINY_CONFIG, "cpu", torch.float32, weights="int8")
    model.setup_caches(2)
    x, pos, window = torch.randn(2, 1, 48), torch.full((2, 1), 3), CacheWindow(4, masked=False)
    eager = model.decoder(x, pos, window)
    model.decoder.compiled_layers = [torch.compile(la, dynamic=True, fullgraph=True) for la in model.decoder.layers]
    try:
        torch.testing.assert_close(model.decoder(x, pos, window), eager, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_random_int8_model_for_benchmarks():
    model = random_model_on(TINY_CONFIG, "cpu", torch.float32, weights="int8")
    assert model.decoder.layers[0].mlp.w13.dtype == torch.int8  # type: ignore[union-attr]
    out = teacher_forced(model, torch.zeros(3, 32, dtype=torch.long))
    assert torch.isfinite(out.depth_logits).all()


def test_cli_quantize_and_say(tiny_dir, tmp_path, capsys):
    from misotts_agents.tools.cli import main

    assert main(["quantize", str(tiny_dir), str(tmp_path / "fp8"), "--weights", "fp8"]) == 0
    with TensorFile(tmp_path / "fp8" / "model.safetensors") as f:
        assert f.tensors["decoder.layers.0.attn.v_proj.weight"].dtype == torch.float8_e4m3fn
    out = tmp_path / "a.wav"
    args = ["say", "Hi.", "--model", str(tiny_dir), "--weights", "int8", "--out", str(out), "--no-watermark"]
    assert main([*args, "--max-ms", "160", "--seed", "1"]) == 0
    assert out.stat().st_size > 44
    assert "wrote" in capsys.readouterr().out


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_FORMATS = [
    "int8",
    pytest.param(
        "fp8",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs >= 8.9"
        ),
    ),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("weights", CUDA_FORMATS)
def test_cuda_8bit_step_compiles_captures_and_replays_the_eager_codes(weights):
    """The frame step's compile-then-CUDA-graph path with 8-bit layers: every shape captured, and
    the graphs replay what the compiled step computes without them."""
    from test_step import cuda_stepper, run_frames

    step = cuda_stepper(TINY_CONFIG, torch.bfloat16, 4, weights=weights)
    assert step.compiled
    assert set(step.graphs) == set(step.shapes())
    replayed = run_frames(step, [0, 2], start=10, frames=6)
    graphs, step.graphs = step.graphs, {}
    try:
        eager = run_frames(step, [0, 2], start=10, frames=6)
    finally:
        step.graphs = graphs
    assert torch.equal(replayed, eager)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("weights", CUDA_FORMATS)
def test_cuda_8bit_logits_stay_near_fp32(tiny_dir, weights):
    codes = torch.randint(0, 2048, (200, 32), generator=torch.Generator().manual_seed(0))
    path = tiny_dir / "model.safetensors"
    reference = teacher_forced(load_model(path, TINY_CONFIG, "cuda", torch.float32, progress=False), codes)
    model = load_model(path, TINY_CONFIG, "cuda", torch.bfloat16, progress=False, weights=weights)
    ours = teacher_forced(model, codes)
    bound = 2 * INT8_LOGIT_BOUND if weights == "int8" else 4 * INT8_LOGIT_BOUND  # bf16 compute; fp8 activations
    assert relative_error(ours.c0_logits, reference.c0_logits) < bound
    assert relative_error(ours.depth_logits, reference.depth_logits) < bound
