"""Our Mimi (misotts_agents.model.mimi) against moshi 0.2.13's, the oracle, with the same random weights.

CPU, float32, a tiny config (same structure and frame/codebook sizes as the real one, far fewer
channels): equal state-dict keys and shapes, equal encode codes, whole-clip decode and streamed decode
(batched rows with random inactive steps and resets, past the 250-step ring) within 1e-5.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel as MoshiMimi

from misotts_agents.model.codec import save_mimi
from misotts_agents.model.mimi import DecodeState, MimiModel, default_config, rename_checkpoint_keys
from misotts_agents.testing.mimi import build_tiny_mimi, fill_codebooks

BINS = 2048
FRAME = 1920
TOLERANCE = 1e-5


def tiny_config(context: int = 250) -> dict[str, Any]:
    """The real structure (hop 960, x2 resampler, 250-step context, 32 x 2048 codebooks), narrow layers."""
    cfg = default_config()
    cfg["seanet"].update(n_filters=4, dimension=32)
    cfg["transformer"].update(
        d_model=32,
        num_heads=2,
        num_layers=2,
        dim_feedforward=64,
        input_dimension=32,
        output_dimensions=[32],
        context=context,
    )
    cfg["quantizer"].update(dimension=8, input_dimension=32, output_dimension=32)
    return cfg


@torch.no_grad()
def _sharpen_attention(model: torch.nn.Module) -> None:
    """Random init leaves the transformers nearly inert (layer scale 0.01, near-uniform attention), so a
    wrong mask or position would hardly move the audio. Full layer scale and 4x larger q/k/v make them count."""
    for name, param in model.named_parameters():
        if "layer_scale" in name:
            param.fill_(1.0)
        elif "in_projs" in name:
            param.mul_(4.0)


def _make_pair(context: int) -> tuple[MoshiMimi, MimiModel]:
    """moshi's Mimi with random weights and codebooks, and ours loaded from its state dict (strict)."""
    cfg = tiny_config(context)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = loaders.get_mimi(None, mimi_config=cfg, device="cpu", num_codebooks=32)
    fill_codebooks(theirs, torch.Generator().manual_seed(1))
    _sharpen_attention(theirs)
    ours = MimiModel(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours


@pytest.fixture(scope="module")
def pair() -> tuple[MoshiMimi, MimiModel]:
    return _make_pair(context=250)


@pytest.fixture(scope="module")
def short_pair() -> tuple[MoshiMimi, MimiModel]:
    """A 12-step attention window: the ring wraps every 6 frames, and its quirk shows plainly."""
    return _make_pair(context=12)


def _shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def test_state_dict_matches_tiny(pair: tuple[MoshiMimi, MimiModel]) -> None:
    theirs, ours = pair
    assert _shapes(ours) == _shapes(theirs)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())


def test_state_dict_matches_default_config() -> None:
    """The released model's layout, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        theirs = loaders.get_mimi(None, mimi_config=default_config(), device="meta", num_codebooks=32)
        ours = MimiModel(default_config())
    assert _shapes(ours) == _shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_make_tiny_files_load_in_moshi(tmp_path: Path) -> None:
    """make-tiny writes Mimi as the released file is written: moshi's own loader takes it, strictly,
    and decodes what ours decodes."""
    make_tiny_mimi = build_tiny_mimi(seed=3)
    save_mimi(make_tiny_mimi, tmp_path)
    theirs = loaders.get_mimi(
        tmp_path / "mimi.safetensors", mimi_config=make_tiny_mimi.config, device="cpu", num_codebooks=32
    )
    codes = torch.randint(0, BINS, (1, 32, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (theirs.decode(codes) - make_tiny_mimi.decode(codes)).abs().max().item() <= TOLERANCE


def test_interface() -> None:
    with torch.device("meta"):
        model = MimiModel(default_config(), num_codebooks=8)
    assert (model.sample_rate, model.frame_rate, model.frame_size, model.cardinality) == (24000, 12.5, FRAME, BINS)
    assert (model.total_codebooks, model.num_codebooks) == (32, 8)
    model.set_num_codebooks(32)
    assert model.num_codebooks == 32
    config = model.config
    assert config == default_config()
    config["seanet"]["ratios"].append(2)
    assert model.config == default_config()  # a copy
    with pytest.raises(ValueError, match="num_codebooks"):
        model.set_num_codebooks(33)


def test_released_checkpoint_names_load(pair: tuple[MoshiMimi, MimiModel]) -> None:
    """kyutai's file names the attention projections ``in_proj_weight`` / ``out_proj.weight``."""
    theirs, _ = pair
    old = {
        k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight").replace(
            "self_attn.out_projs.0.weight", "self_attn.out_proj.weight"
        ): v
        for k, v in theirs.state_dict().items()
    }
    assert any(k.endswith("in_proj_weight") for k in old)
    fresh = MimiModel(tiny_config())
    fresh.load_state_dict(old, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in theirs.state_dict().items())
    assert set(rename_checkpoint_keys(old)) == set(theirs.state_dict())


@pytest.mark.parametrize(
    ("batch", "length"),
    [(1, 1), (2, FRAME), (3, 5000), (2, 13 * FRAME + 7), (4, 9 * FRAME)],  # 4 x 9 = 36 rows > 25 for cdist
)
def test_encode_codes_equal(pair: tuple[MoshiMimi, MimiModel], batch: int, length: int) -> None:
    theirs, ours = pair
    audio = torch.randn(batch, 1, length, generator=torch.Generator().manual_seed(length)) * 0.3
    with torch.no_grad():
        expected = theirs.encode(audio)
    got = ours.encode(audio)
    assert got.dtype == torch.int64
    assert got.shape == (batch, 32, -(-length // FRAME))
    assert torch.equal(got, expected)


def test_encode_fewer_codebooks(pair: tuple[MoshiMimi, MimiModel]) -> None:
    theirs, ours = pair
    audio = torch.randn(2, 1, 3 * FRAME, generator=torch.Generator().manual_seed(3))
    theirs.set_num_codebooks(8)
    ours.set_num_codebooks(8)
    try:
        with torch.no_grad():
            expected = theirs.encode(audio)
        got = ours.encode(audio)
    finally:
        theirs.set_num_codebooks(32)
        ours.set_num_codebooks(32)
    assert got.shape == (2, 8, 3)
    assert torch.equal(got, expected)


def _random_codes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, BINS, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("codebooks", "frames"), [(32, 1), (32, 9), (8, 4), (32, 140)])  # 140 frames: past 250 steps
def test_whole_clip_decode(pair: tuple[MoshiMimi, MimiModel], codebooks: int, frames: int) -> None:
    theirs, ours = pair
    codes = _random_codes((2, codebooks, frames), seed=frames)
    with torch.no_grad():
        expected = theirs.decode(codes)
    got = ours.decode(codes)
    assert got.shape == (2, 1, frames * FRAME)
    assert (got - expected).abs().max().item() <= TOLERANCE


def test_whole_clip_with_a_short_window(short_pair: tuple[MoshiMimi, MimiModel]) -> None:
    """A 12-step window over 40 latent steps: the banded mask decides most of the attention."""
    theirs, ours = short_pair
    audio = torch.randn(2, 1, 20 * FRAME, generator=torch.Generator().manual_seed(9)) * 0.3
    codes = _random_codes((2, 32, 20), seed=9)
    with torch.no_grad():
        expected_codes, expected_audio = theirs.encode(audio), theirs.decode(codes)
    assert torch.equal(ours.encode(audio), expected_codes)
    assert (ours.decode(codes) - expected_audio).abs().max().item() <= TOLERANCE


def test_streamed_decode_equals_whole_clip_before_the_ring_wraps(pair: tuple[MoshiMimi, MimiModel]) -> None:
    """One row, 8 codebooks: the streamed frames are the whole clip's (moshi's convolution states are exact)."""
    _, ours = pair
    codes = _random_codes((1, 8, 6), seed=4)
    state = ours.decode_state(1)
    active = torch.ones(1, dtype=torch.bool)
    streamed = torch.cat([ours.decode_step(codes[:, :, i], state, active) for i in range(6)], dim=1)
    assert (streamed - ours.decode(codes)[:, 0]).abs().max().item() <= TOLERANCE


def _rows(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of a state tensor: dim 2 of the (layers, 2, B, ...) cache, dim 0 of the others."""
    return tensor[:, :, rows] if tensor.dim() == 6 else tensor[rows]


def _snapshot(state: DecodeState) -> list[torch.Tensor]:
    return [t.clone() for t in state.tensors()]


def _stream_both(pair: tuple[MoshiMimi, MimiModel], batch: int, steps: int, seed: int) -> tuple[float, Any]:
    """Stream random codes through moshi and ours under the same random masks and resets; row 0 is
    always active and never reset. Returns the worst active-row difference and row 0's (codes, audio)."""
    theirs, ours = pair
    g = torch.Generator().manual_seed(seed)
    state = ours.decode_state(batch)
    worst = 0.0
    row0_codes, row0_audio = [], []
    with torch.no_grad(), theirs.streaming(batch):
        for _ in range(steps):
            codes = torch.randint(0, BINS, (batch, 32), generator=g)
            active = torch.rand(batch, generator=g) < 0.7
            reset = torch.rand(batch, generator=g) < 0.05
            active[0], reset[0] = True, False
            theirs.reset_streaming(reset)
            state.reset(reset)
            theirs.set_exec_mask(active)  # after the reset: moshi's reset re-enables the reset rows
            expected = theirs.decode(codes[:, :, None])[:, 0]
            got = ours.decode_step(codes, state, active)
            assert got.shape == (batch, FRAME)
            worst = max(worst, (got - expected)[active].abs().max().item())
            row0_codes.append(codes[0])
            row0_audio.append(got[0])
    assert state.positions[0].item() == 2 * steps
    return worst, (torch.stack(row0_codes, dim=1)[None], torch.stack(row0_audio))


def _departure_from_whole_clip(model: MimiModel, row0: Any) -> torch.Tensor:
    """Per frame, how far row 0's streamed audio is from decoding its codes as one clip."""
    codes, audio = row0
    whole = model.decode(codes)[0, 0].view(codes.shape[-1], FRAME)
    return (audio - whole).abs().amax(dim=1)


def test_streamed_decode_matches_moshi(pair: tuple[MoshiMimi, MimiModel]) -> None:
    """Four rows, rows 1-3 skipping steps and restarting at random; row 0 runs 130 frames (260 steps:
    its ring of 250 wraps)."""
    worst, row0 = _stream_both(pair, batch=4, steps=130, seed=11)
    assert worst <= TOLERANCE
    assert _departure_from_whole_clip(pair[1], row0)[:125].max().item() <= TOLERANCE  # unwrapped: the same


def test_streamed_decode_matches_moshi_through_many_wraps(short_pair: tuple[MoshiMimi, MimiModel]) -> None:
    """With a 12-step window the ring wraps every 6 frames; once it has, each frame's first step sees 11
    past steps, not 12, so moshi's streamed audio leaves the whole clip's, and ours follows moshi's."""
    worst, row0 = _stream_both(short_pair, batch=4, steps=40, seed=12)
    assert worst <= TOLERANCE
    departure = _departure_from_whole_clip(short_pair[1], row0)
    assert departure[:6].max().item() <= TOLERANCE
    assert departure[6:].max().item() > 100 * TOLERANCE


def test_inactive_rows_keep_their_state_exactly(pair: tuple[MoshiMimi, MimiModel]) -> None:
    _, ours = pair
    state = ours.decode_state(3)
    g = torch.Generator().manual_seed(5)
    everyone = torch.ones(3, dtype=torch.bool)
    for _ in range(3):
        ours.decode_step(torch.randint(0, BINS, (3, 32), generator=g), state, everyone)
    before = _snapshot(state)
    ours.decode_step(torch.randint(0, BINS, (3, 32), generator=g), state, torch.zeros(3, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors(), strict=True))
    ours.decode_step(torch.randint(0, BINS, (3, 32), generator=g), state, torch.tensor([True, False, True]))
    for old, new in zip(before, state.tensors(), strict=True):
        row_dim = 2 if new.dim() == 6 else 0  # the cache is (layers, 2, B, ...)
        assert torch.equal(old.select(row_dim, 1), new.select(row_dim, 1))
        assert not torch.equal(old.select(row_dim, 0), new.select(row_dim, 0))


def test_reset_rows_decode_as_fresh_streams(pair: tuple[MoshiMimi, MimiModel]) -> None:
    _, ours = pair
    g = torch.Generator().manual_seed(6)
    history = torch.randint(0, BINS, (5, 2, 32), generator=g)
    after = torch.randint(0, BINS, (4, 2, 32), generator=g)
    active = torch.ones(2, dtype=torch.bool)
    state, fresh = ours.decode_state(2), ours.decode_state(2)
    for codes in history:
        ours.decode_step(codes, state, active)
    kept = _snapshot(state)
    state.reset(torch.tensor([False, True]))
    assert state.positions.tolist() == [10, 0]
    for old, new, zero in zip(kept, state.tensors(), fresh.tensors(), strict=True):
        if new.dim() != 6:  # the cache keeps its (now masked) slots, as in moshi
            assert torch.equal(new[1], zero[1])
            assert torch.equal(new[0], old[0])
    for codes in after:
        got = ours.decode_step(codes, state, active)
        expected = ours.decode_step(codes, fresh, active)
        assert torch.equal(got[1], expected[1])


def test_leading_rows_view_steps_the_full_state(pair: tuple[MoshiMimi, MimiModel]) -> None:
    """Stepping ``state.rows(2)`` of a 4-row state is stepping those rows with the others inactive
    (up to float rounding: products over 2 rows and over 4 may sum in another order)."""
    _, ours = pair
    g = torch.Generator().manual_seed(10)
    full, reference = ours.decode_state(4), ours.decode_state(4)
    view = full.rows(2)
    for _ in range(3):
        codes = torch.randint(0, BINS, (4, 32), generator=g)
        active = torch.tensor([True, True, False, False])
        got = ours.decode_step(codes[:2], view, active[:2])
        expected = ours.decode_step(codes, reference, active)
        assert (got - expected[:2]).abs().max().item() <= 1e-6
    view.reset(torch.tensor([False, True]))
    reference.reset(torch.tensor([False, True, False, False]))
    for a, b in zip(full.tensors(), reference.tensors(), strict=True):
        assert torch.equal(_rows(a, slice(2, 4)), _rows(b, slice(2, 4)))  # untouched in both
        peak = max(b.abs().max().item(), 1.0)
        assert (a.double() - b.double()).abs().max().item() <= 1e-5 * peak


def test_decode_step_on_static_buffers(pair: tuple[MoshiMimi, MimiModel]) -> None:
    """What a CUDA graph needs, checked on CPU: the same input buffers rewritten in place between calls,
    the state updated in place (fixed addresses), the same results as fresh tensors each call."""
    _, ours = pair
    g = torch.Generator().manual_seed(7)
    static_codes = torch.zeros(3, 32, dtype=torch.long)
    static_active = torch.zeros(3, dtype=torch.bool)
    graphed, eager = ours.decode_state(3), ours.decode_state(3)
    addresses = [t.data_ptr() for t in graphed.tensors()]
    for _ in range(6):
        codes = torch.randint(0, BINS, (3, 32), generator=g)
        active = torch.rand(3, generator=g) < 0.7
        static_codes.copy_(codes)
        static_active.copy_(active)
        got = ours.decode_step(static_codes, graphed, static_active)
        expected = ours.decode_step(codes, eager, active)
        assert torch.equal(got[active], expected[active])
    assert [t.data_ptr() for t in graphed.tensors()] == addresses
    assert all(torch.equal(a, b) for a, b in zip(graphed.tensors(), eager.tensors(), strict=True))


def _with(section: str | None, key: str, value: object) -> dict[str, Any]:
    cfg = copy.deepcopy(tiny_config())
    target = cfg if section is None else cfg[section]
    if value is _MISSING:
        del target[key]
    else:
        target[key] = value
    return cfg


_MISSING = object()


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("transformer", "gating", "silu", "transformer.gating"),
        ("transformer", "norm", "rms_norm", "transformer.norm"),
        ("transformer", "causal", False, "transformer.causal"),
        ("transformer", "context", None, "transformer.context"),
        ("transformer", "kv_repeat", 2, "transformer.kv_repeat"),
        ("transformer", "num_heads", _MISSING, "transformer.num_heads"),
        ("seanet", "causal", False, "seanet.causal"),
        ("seanet", "norm", "weight_norm", "seanet.norm"),
        ("seanet", "pad_mode", "reflect", "seanet.pad_mode"),
        ("quantizer", "bins", "2048", "quantizer.bins"),
        (None, "frame_rate", 10.0, "frame_rate"),
        (None, "extra", 1, "extra"),
        (None, "seanet", _MISSING, "seanet"),
    ],
)
def test_config_errors_name_the_key(section: str | None, key: str, value: object, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        MimiModel(_with(section, key, value))
