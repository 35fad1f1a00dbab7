"""Strict checkpoint loading: the real format, clear errors naming the bad key or file."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from misotts_agents.errors import CheckpointError, ModelSourceError
from misotts_agents.model import tensorfile
from misotts_agents.model.config import CSM_1B, MISOTTS_8B, ModelConfig
from misotts_agents.model.sources import fetch_file
from misotts_agents.model.weights import expected_shapes, load_model
from misotts_agents.testing.tiny import TINY_CONFIG


def test_official_8b_layout():
    shapes = expected_shapes(MISOTTS_8B)
    assert len(shapes) == 367
    assert sum(math.prod(s) for s in shapes.values()) == 8_188_122_112
    assert shapes["audio_head"] == (31, 1536, 2051)
    assert shapes["backbone.layers.31.attn.k_proj.weight"] == (1024, 4096)
    assert shapes["decoder.layers.7.mlp.w1.weight"] == (6912, 1536)
    assert shapes["audio_embeddings.weight"] == (65632, 4096)


def test_csm_1b_layout():
    shapes = expected_shapes(CSM_1B)
    assert len(shapes) == 16 * 9 + 1 + 4 * 9 + 1 + 5
    assert shapes["projection.weight"] == (1024, 2048)


def test_custom_flavor_round_trip(tiny_dir):
    config = ModelConfig.load(tiny_dir / "config.json")
    assert config == TINY_CONFIG
    model = load_model(tiny_dir / "model.safetensors", config, progress=False)
    assert model.backbone.flavor.embed_dim == 64
    assert len(model.decoder.layers) == 1
    assert model.dtype == torch.float32


def test_bf16_load(tiny_dir):
    model = load_model(tiny_dir / "model.safetensors", TINY_CONFIG, dtype=torch.bfloat16, progress=False)
    assert model.audio_head.dtype == torch.bfloat16
    assert model.backbone.rope.dtype == torch.bfloat16  # rounded like the reference's model.to(bf16)


@pytest.fixture
def state(tiny_dir):
    return load_file(str(tiny_dir / "model.safetensors"))


def _write(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path


def test_missing_key_is_named(tmp_path, state):
    del state["decoder.layers.0.mlp.w3.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.layers\.0\.mlp\.w3\.weight"):
        load_model(_write(tmp_path, state), TINY_CONFIG, progress=False)


def test_unexpected_key_is_named(tmp_path, state):
    state["backbone.layers.2.attn.q_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=r"unexpected keys: backbone\.layers\.2\.attn\.q_proj\.weight"):
        load_model(_write(tmp_path, state), TINY_CONFIG, progress=False)


def test_misshaped_key_is_named(tmp_path, state):
    state["codebook0_head.weight"] = torch.zeros(2048, 64)
    with pytest.raises(CheckpointError, match=r"codebook0_head\.weight has shape \(2048, 64\).*\(2051, 64\)"):
        load_model(_write(tmp_path, state), TINY_CONFIG, progress=False)


def test_wrong_config_for_checkpoint(tiny_dir):
    with pytest.raises(CheckpointError, match="does not match the model config"):
        load_model(tiny_dir / "model.safetensors", CSM_1B, progress=False)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(path, TINY_CONFIG, progress=False)


def test_truncated_checkpoint(tmp_path, tiny_dir):
    data = (tiny_dir / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(path, TINY_CONFIG, progress=False)


def test_missing_file_in_local_dir(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model\.safetensors is missing"):
        fetch_file(tmp_path, "model.safetensors", "model weights")


def test_missing_local_dir(tmp_path):
    with pytest.raises(ModelSourceError, match="no such directory"):
        fetch_file(tmp_path / "nope", "model.safetensors", "model weights")


def test_hub_repo_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache"):
        fetch_file("MisoLabs/MisoTTS", "model.safetensors", "model weights")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"backbone_flavor": "llama-9B", "decoder_flavor": "llama-300M"}, "unknown flavor"),
        ({"decoder_flavor": "llama-300M"}, "missing"),
        ({"backbone_flavor": {"num_layers": 2}, "decoder_flavor": "llama-300M"}, "needs exactly the keys"),
        (
            {
                "backbone_flavor": {
                    "num_layers": 2,
                    "num_heads": 3,
                    "num_kv_heads": 1,
                    "embed_dim": 64,
                    "intermediate_dim": 8,
                },
                "decoder_flavor": "llama-300M",
            },
            "not divisible",
        ),
        (
            {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "audio_num_codebooks": 0},
            "positive",
        ),
    ],
)
def test_bad_config(tmp_path, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(path)


def test_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.load(path)


# ------------------------------------------------------------------- lean loading (tensorfile.py)


def _state_dict_equal(model, state, dtype):
    ours = model.state_dict()
    for key, tensor in state.items():
        assert ours[key].dtype == dtype
        assert torch.equal(ours[key], tensor.to(dtype)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_read_in_small_pieces_convert_exactly(tiny_dir, state, monkeypatch, dtype):
    """Pieces of 1000 bytes cut tensors mid-row: every value still lands where it belongs."""
    monkeypatch.setattr(tensorfile, "PIECE_BYTES", 1000)
    model = load_model(tiny_dir / "model.safetensors", TINY_CONFIG, dtype=dtype, progress=False)
    _state_dict_equal(model, state, dtype)


def test_a_half_precision_checkpoint_loads_as_fp32(tmp_path, state):
    half = {k: v.half() for k, v in state.items()}
    model = load_model(_write(tmp_path, half), TINY_CONFIG, progress=False)
    _state_dict_equal(model, half, torch.float32)


def test_a_non_float_tensor_is_named(tmp_path, state):
    state["projection.weight"] = torch.zeros(48, 64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"projection\.weight has dtype torch\.int32"):
        load_model(_write(tmp_path, state), TINY_CONFIG, progress=False)


def test_a_header_whose_offsets_lie_is_refused(tmp_path, tiny_dir):
    data = bytearray((tiny_dir / "model.safetensors").read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    begin, end = header["audio_head"]["data_offsets"]
    header["audio_head"]["data_offsets"] = [begin, end - 4]  # one float short of its shape
    text = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[8 + length :]))
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file: audio_head: offsets"):
        load_model(path, TINY_CONFIG, progress=False)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_checkpoint_is_never_mapped_while_loading(tiny_dir, monkeypatch):
    """Pages of a mapped file count in the resident size until the map closes: the loader reads."""
    path = tiny_dir / "model.safetensors"
    seen = []
    real = tensorfile.TensorFile.read_into

    def spy(self, name, out):
        real(self, name, out)
        seen.append(str(path.resolve()) in Path("/proc/self/maps").read_text())

    monkeypatch.setattr(tensorfile.TensorFile, "read_into", spy)
    load_model(path, TINY_CONFIG, progress=False)
    assert seen
    assert not any(seen)
