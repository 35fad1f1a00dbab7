"""Tests for misotts_agents.model.codec on the tiny random Mimi (offline, CPU, a few seconds)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.model import codec
from misotts_agents.model.codec import CODEBOOK_SIZE, NUM_CODEBOOKS, CodecUnavailable
from misotts_agents.model.mimi_stream import MimiStreamDecoder
from misotts_agents.testing import mimi as mimi_fixtures


@pytest.fixture(scope="session")
def mimi() -> codec.MimiModel:
    return mimi_fixtures.build_tiny_mimi(seed=0)


@pytest.fixture(scope="session")
def saved_dir(mimi: codec.MimiModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return codec.save_mimi(mimi, tmp_path_factory.mktemp("tiny_mimi"))


def random_codes(num_frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, num_frames), generator=g)


def stream_single(mimi: codec.MimiModel, codes: torch.Tensor) -> torch.Tensor:
    """Reference: a fresh batch-1 decoder fed one frame at a time -> (T * 1920,)."""
    with MimiStreamDecoder(mimi, batch_size=1) as dec:
        return torch.cat([dec.decode(codes[:, t][None])[0] for t in range(codes.shape[1])])


def assert_close_to_peak(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    peak = expected.abs().max().item()
    assert peak > 0
    err = (actual - expected).abs().max().item()
    assert err <= rel * peak, f"max abs err {err:.3g} vs peak {peak:.3g}"


def test_constants_and_tiny_interface(mimi: codec.MimiModel) -> None:
    assert (SAMPLE_RATE, FRAME_SAMPLES, NUM_CODEBOOKS, CODEBOOK_SIZE) == (24000, 1920, 32, 2048)
    assert mimi.sample_rate == SAMPLE_RATE
    assert mimi.frame_size == FRAME_SAMPLES
    assert mimi.cardinality == CODEBOOK_SIZE
    assert mimi.total_codebooks == mimi.num_codebooks == NUM_CODEBOOKS
    assert not mimi.training
    assert sum(p.numel() for p in mimi.parameters()) < 1_000_000


def test_build_tiny_is_deterministic_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = mimi_fixtures.build_tiny_mimi(seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = mimi_fixtures.build_tiny_mimi(seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = mimi_fixtures.build_tiny_mimi(seed=8)
    assert not torch.equal(
        sa["quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"],
        c.state_dict()["quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"],
    )


def test_streaming_one_frame_at_a_time_equals_whole_clip(mimi: codec.MimiModel) -> None:
    codes = random_codes(12, seed=1)
    whole = codec.decode(mimi, codes)
    assert whole.shape == (12 * FRAME_SAMPLES,)
    assert whole.dtype == torch.float32
    assert whole.std() > 0
    # The helper is a thin wrapper over the model's own non-streaming decode.
    with torch.inference_mode():
        assert torch.equal(whole, mimi.decode(codes[None])[0, 0])
    assert_close_to_peak(stream_single(mimi, codes), whole)


def test_codes_drive_the_output(mimi: codec.MimiModel) -> None:
    # Guards against all-zero codebooks (random-init Mimi ignores its input).
    a = codec.decode(mimi, random_codes(3, seed=2))
    b = codec.decode(mimi, random_codes(3, seed=3))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_batched_rows_with_inactive_steps_equal_single_decodes(mimi: codec.MimiModel) -> None:
    seq = [random_codes(7, seed=10), random_codes(7, seed=11)]
    refs = [stream_single(mimi, s).view(-1, FRAME_SAMPLES) for s in seq]
    # Row 1 sits out steps 1, 2 and 5, row 0 steps 7-9; each consumes its frames in order when active.
    schedule = [
        (True, True),
        (True, False),
        (True, False),
        (True, True),
        (True, True),
        (True, False),
        (True, True),
        (False, True),
        (False, True),
        (False, True),
    ]
    got: list[list[torch.Tensor]] = [[], []]
    pos = [0, 0]
    with MimiStreamDecoder(mimi, batch_size=2) as dec:
        for act in schedule:
            frame = torch.stack([seq[r][:, pos[r]] if act[r] else torch.full((NUM_CODEBOOKS,), 4095) for r in range(2)])
            out = dec.decode(frame, active=torch.tensor(act))
            assert out.shape == (2, FRAME_SAMPLES)
            for r in range(2):
                if act[r]:
                    got[r].append(out[r])
                    pos[r] += 1
                else:
                    assert torch.count_nonzero(out[r]) == 0
    assert pos == [7, 7]
    for r in range(2):
        assert_close_to_peak(torch.stack(got[r]), refs[r])


def test_reset_one_row_equals_fresh_decoder(mimi: codec.MimiModel) -> None:
    row0 = random_codes(6, seed=20)
    warm = random_codes(3, seed=21)
    new = random_codes(3, seed=22)
    ref0 = stream_single(mimi, row0).view(-1, FRAME_SAMPLES)
    ref_new = stream_single(mimi, new).view(-1, FRAME_SAMPLES)
    with MimiStreamDecoder(mimi, batch_size=2) as dec:
        out0, out1 = [], []
        for t in range(3):
            out0.append(dec.decode(torch.stack([row0[:, t], warm[:, t]]))[0])
        dec.reset([1])
        for t in range(3):
            o = dec.decode(torch.stack([row0[:, 3 + t], new[:, t]]))
            out0.append(o[0])
            out1.append(o[1])
        # reset() with no rows restarts everything.
        dec.reset()
        assert_close_to_peak(dec.decode(torch.stack([new[:, 0], row0[:, 0]]))[0], ref_new[0])
    assert_close_to_peak(torch.stack(out0), ref0)
    assert_close_to_peak(torch.stack(out1), ref_new)


def test_warm_up_leaves_every_row_as_a_fresh_decoder(mimi: codec.MimiModel) -> None:
    codes = random_codes(4, seed=23)
    ref = stream_single(mimi, codes).view(-1, FRAME_SAMPLES)
    with MimiStreamDecoder(mimi, batch_size=2) as dec:
        dec.warm_up()
        out = [dec.decode(torch.stack([codes[:, t], codes[:, t]])) for t in range(4)]
    assert_close_to_peak(torch.stack([o[0] for o in out]), ref)
    assert_close_to_peak(torch.stack([o[1] for o in out]), ref)


def test_decoder_rejects_bad_codes(mimi: codec.MimiModel) -> None:
    good = random_codes(1, seed=30).T.repeat(2, 1)  # (2, 32)
    with MimiStreamDecoder(mimi, batch_size=2) as dec:
        for bad_value in (CODEBOOK_SIZE, CODEBOOK_SIZE + 2, -1):
            bad = good.clone()
            bad[1, 5] = bad_value
            with pytest.raises(ValueError, match=r"0\.\.2047"):
                dec.decode(bad)
            # An inactive row may carry anything: it is never looked up.
            dec.decode(bad, active=torch.tensor([True, False]))
        with pytest.raises(ValueError, match="integer"):
            dec.decode(good.float())
        with pytest.raises(ValueError, match="shape"):
            dec.decode(good[:0])
        with pytest.raises(ValueError, match="shape"):
            dec.decode(good.repeat(2, 1))  # 4 rows for a 2-row decoder
        with pytest.raises(ValueError, match="shape"):
            dec.decode(good[:, :8])
        with pytest.raises(ValueError, match="active"):
            dec.decode(good, active=torch.tensor([1, 0]))
        with pytest.raises(IndexError):
            dec.reset([2])
    with pytest.raises(ValueError, match=r"0\.\.2047"):
        codec.decode(mimi, torch.full((NUM_CODEBOOKS, 2), CODEBOOK_SIZE))


def test_decoders_are_independent_and_close_releases(mimi: codec.MimiModel) -> None:
    # The model holds no streaming state: two decoders on one model (two engines in a process) do not
    # see each other's rows.
    codes = random_codes(3, seed=31)
    ref = stream_single(mimi, codes)
    dec, other = MimiStreamDecoder(mimi, batch_size=1), MimiStreamDecoder(mimi, batch_size=3)
    got = []
    for t in range(3):
        other.decode(random_codes(1, seed=32 + t).T.repeat(3, 1))
        got.append(dec.decode(codes[:, t][None])[0])
    assert_close_to_peak(torch.cat(got), ref)
    dec.close()
    dec.close()
    assert dec.closed
    with pytest.raises(RuntimeError, match="closed"):
        dec.decode(torch.zeros(1, NUM_CODEBOOKS, dtype=torch.long))
    with pytest.raises(RuntimeError, match="closed"):
        dec.reset()
    other.close()


def test_leading_rows_decode_leaves_the_others_untouched(mimi: codec.MimiModel) -> None:
    # The engine decodes rows [0, n) up to its highest speaking slot when the step buckets its batch.
    seq = [random_codes(4, seed=33 + r) for r in range(3)]
    refs = [stream_single(mimi, s).view(-1, FRAME_SAMPLES) for s in seq]
    with MimiStreamDecoder(mimi, batch_size=4, graph_sizes=[1, 2, 4]) as dec:
        assert [dec.rows_for(r) for r in range(4)] == [1, 2, 4, 4]
        first = dec.decode(torch.stack([s[:, 0] for s in seq] + [seq[0][:, 0]]))  # all four rows
        rest = [dec.decode(torch.stack([seq[0][:, t], seq[1][:, t]])) for t in range(1, 4)]  # rows 0-1 only
        row2 = [
            dec.decode(torch.stack([seq[0][:, 0], seq[1][:, 0], seq[2][:, t]]), torch.tensor([False, False, True]))
            for t in range(1, 4)
        ]
    for r in range(2):
        assert_close_to_peak(torch.stack([first[r]] + [o[r] for o in rest]), refs[r])
    assert_close_to_peak(torch.stack([first[2]] + [o[2] for o in row2]), refs[2])


def test_whole_clip_calls_do_not_disturb_an_open_decoder(mimi: codec.MimiModel) -> None:
    codes = random_codes(4, seed=40)
    ref = stream_single(mimi, codes)
    with MimiStreamDecoder(mimi, batch_size=1) as dec:
        first = [dec.decode(codes[:, t][None])[0] for t in range(2)]
        audio = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 0.1
        assert codec.encode(mimi, audio).shape == (NUM_CODEBOOKS, 3)
        codec.decode(mimi, random_codes(2, seed=41))
        rest = [dec.decode(codes[:, t][None])[0] for t in range(2, 4)]
    assert_close_to_peak(torch.cat(first + rest), ref)


@pytest.mark.parametrize("num_samples", [SAMPLE_RATE, FRAME_SAMPLES * 3, FRAME_SAMPLES * 3 + 1, 100])
def test_encode_shape_and_range(mimi: codec.MimiModel, num_samples: int) -> None:
    g = torch.Generator().manual_seed(num_samples)
    t = torch.arange(num_samples) / SAMPLE_RATE
    audio = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(num_samples, generator=g)
    codes = codec.encode(mimi, audio)
    assert codes.dtype == torch.int64
    assert codes.shape == (NUM_CODEBOOKS, codec.num_frames(num_samples))
    assert codes.shape[1] == -(-num_samples // FRAME_SAMPLES)
    assert int(codes.min()) >= 0
    assert int(codes.max()) < CODEBOOK_SIZE
    if num_samples == SAMPLE_RATE:
        assert codes.shape == (32, 13)
        assert codes.unique().numel() > 10  # random codebooks give varied codes, not all zeros


def test_encode_rejects_bad_audio(mimi: codec.MimiModel) -> None:
    with pytest.raises(ValueError, match="1-D mono audio"):
        codec.encode(mimi, torch.zeros(2, 100))
    with pytest.raises(ValueError, match="empty clip"):
        codec.encode(mimi, torch.zeros(0))
    with pytest.raises(ValueError, match="float samples"):
        codec.encode(mimi, torch.zeros(100, dtype=torch.int16))


def test_save_load_round_trip(mimi: codec.MimiModel, saved_dir: Path) -> None:
    assert (saved_dir / codec.WEIGHTS_FILENAME).is_file()
    cfg = json.loads((saved_dir / codec.CONFIG_FILENAME).read_text())
    assert cfg == mimi_fixtures.tiny_mimi_config()
    for source in (saved_dir, str(saved_dir), saved_dir / codec.WEIGHTS_FILENAME):
        loaded = codec.load_mimi(source)
        assert not loaded.training
        assert loaded.num_codebooks == NUM_CODEBOOKS
        want, have = mimi.state_dict(), loaded.state_dict()
        assert want.keys() == have.keys()
        assert any(k.endswith("embedding_sum") for k in have)
        assert any(k.endswith("cluster_usage") for k in have)
        assert any(k.endswith("_initialized") for k in have)
        for k in want:
            assert torch.equal(want[k], have[k]), k
    codes = random_codes(3, seed=50)
    assert torch.equal(codec.decode(loaded, codes), codec.decode(mimi, codes))
    assert torch.equal(stream_single(loaded, codes), stream_single(mimi, codes))
    assert codec.load_mimi(saved_dir, num_codebooks=8).num_codebooks == 8


def test_load_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CodecUnavailable, match="no such file") as info:
        codec.load_mimi(missing)
    assert str(missing) in str(info.value)
    assert "make-tiny" in str(info.value)
    assert "kyutai/moshiko-pytorch-bf16" in str(info.value)


def test_load_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / codec.CONFIG_FILENAME).write_text(json.dumps(mimi_fixtures.tiny_mimi_config()))
    with pytest.raises(CodecUnavailable, match=r"mimi\.safetensors") as info:
        codec.load_mimi(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_load_corrupt_safetensors(tmp_path: Path, saved_dir: Path) -> None:
    (tmp_path / codec.CONFIG_FILENAME).write_bytes((saved_dir / codec.CONFIG_FILENAME).read_bytes())
    weights = tmp_path / codec.WEIGHTS_FILENAME
    weights.write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CodecUnavailable) as info:
        codec.load_mimi(tmp_path)
    assert str(weights) in str(info.value)
    # Truncated real file.
    weights.write_bytes((saved_dir / codec.WEIGHTS_FILENAME).read_bytes()[:5000])
    with pytest.raises(CodecUnavailable) as info:
        codec.load_mimi(weights)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("transformer", {"num_layers": 2}),  # missing keys
        ("quantizer", {"dimension": 16}),  # size mismatch
        ("seanet", {"bogus_kwarg": 1}),  # a key the model does not know
        ("transformer", {"gating": "silu"}),  # a value the model does not implement
    ],
)
def test_load_config_not_matching_weights(tmp_path: Path, saved_dir: Path, part: str, change: dict) -> None:
    cfg = mimi_fixtures.tiny_mimi_config()
    cfg[part].update(change)
    (tmp_path / codec.CONFIG_FILENAME).write_text(json.dumps(cfg))
    (tmp_path / codec.WEIGHTS_FILENAME).write_bytes((saved_dir / codec.WEIGHTS_FILENAME).read_bytes())
    with pytest.raises(CodecUnavailable) as info:
        codec.load_mimi(tmp_path)
    assert str(tmp_path / codec.WEIGHTS_FILENAME) in str(info.value)


def test_load_bad_config_json(tmp_path: Path, saved_dir: Path) -> None:
    (tmp_path / codec.WEIGHTS_FILENAME).write_bytes((saved_dir / codec.WEIGHTS_FILENAME).read_bytes())
    config = tmp_path / codec.CONFIG_FILENAME
    config.write_text("{oops")
    with pytest.raises(CodecUnavailable) as info:
        codec.load_mimi(tmp_path)
    assert str(config) in str(info.value)
    config.write_text(json.dumps({"seanet": {}}))
    with pytest.raises(CodecUnavailable, match="missing the keys"):
        codec.load_mimi(tmp_path)


def test_load_rejects_incompatible_interface(tmp_path: Path) -> None:
    cfg = mimi_fixtures.tiny_mimi_config()
    cfg["quantizer"]["bins"] = 1024
    codec.save_mimi(codec.MimiModel(cfg), tmp_path)
    with pytest.raises(CodecUnavailable, match="codebook size 1024"):
        codec.load_mimi(tmp_path)


def test_default_source_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> str:
        raise OSError("offline for the test")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for source in (None, "default"):
        with pytest.raises(CodecUnavailable, match="kyutai/moshiko-pytorch-bf16") as info:
            codec.load_mimi(source)
        assert "offline for the test" in str(info.value)


def test_inactive_steps_after_kv_ring_wraps(mimi: codec.MimiModel) -> None:
    # The decoder transformer's ring KV cache holds 250 steps = 125 frames (10 s). A masked-off step
    # still writes its K/V into the ring slot after the row's end; once the ring has wrapped that slot
    # holds the row's oldest entry. It must be out of the attention window (and then overwritten).
    frames = 140
    seq = [random_codes(frames, seed=60), random_codes(frames, seed=61)]
    refs = [codec.decode(mimi, s).view(-1, FRAME_SAMPLES) for s in seq]
    got: list[list[torch.Tensor]] = [[], []]
    pos = [0, 0]
    step = 0
    with MimiStreamDecoder(mimi, batch_size=2) as dec:
        while min(pos) < frames:
            act = [pos[0] < frames, pos[1] < frames and not (step % 9 == 4 or 128 <= step < 131)]
            frame = torch.stack([seq[r][:, min(pos[r], frames - 1)] for r in range(2)])
            out = dec.decode(frame, active=torch.tensor(act))
            for r in range(2):
                if act[r]:
                    got[r].append(out[r])
                    pos[r] += 1
            step += 1
    assert step > frames + 10
    for r in range(2):
        assert_close_to_peak(torch.stack(got[r]), refs[r])


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop", "1 missing keys: decoder_transformer.transformer.layers.0.linear1.weight"),
        ("add", "1 unexpected keys: encoder.extra.weight"),
        ("reshape", "decoder_transformer.transformer.layers.0.linear1.weight (checkpoint (64, 16)"),
    ],
)
def test_load_names_the_tensor_that_does_not_match(tmp_path: Path, saved_dir: Path, edit: str, named: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved_dir / codec.WEIGHTS_FILENAME))
    key = "decoder_transformer.transformer.layers.0.linear1.weight"
    if edit == "drop":
        del tensors[key]
    elif edit == "add":
        tensors["encoder.extra.weight"] = torch.zeros(2)
    else:
        tensors[key] = torch.zeros(64, 16)
    save_file(tensors, str(tmp_path / codec.WEIGHTS_FILENAME))
    (tmp_path / codec.CONFIG_FILENAME).write_bytes((saved_dir / codec.CONFIG_FILENAME).read_bytes())
    with pytest.raises(CodecUnavailable, match="does not match the model") as info:
        codec.load_mimi(tmp_path)
    assert named in str(info.value)


def test_saved_like_the_released_file_and_loads_either_naming(tmp_path: Path, saved_dir: Path) -> None:
    # kyutai's checkpoint stores each attention's projections as in_proj_weight / out_proj.weight;
    # moshi's state dict (and ours) says in_projs.0.weight / out_projs.0.weight. Both load.
    from safetensors.torch import load_file, save_file

    released = load_file(str(saved_dir / codec.WEIGHTS_FILENAME))
    assert "decoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in released
    assert "decoder_transformer.transformer.layers.0.self_attn.out_proj.weight" in released
    assert not any("in_projs" in name or "out_projs" in name for name in released)
    ours = {
        name.replace("in_proj_weight", "in_projs.0.weight").replace("out_proj.weight", "out_projs.0.weight"): t
        for name, t in released.items()
    }
    save_file(ours, str(tmp_path / codec.MIMI_FILENAME))
    (tmp_path / codec.CONFIG_FILENAME).write_bytes((saved_dir / codec.CONFIG_FILENAME).read_bytes())
    loaded = codec.load_mimi(tmp_path)  # the directory holds the file under the Hub's name
    codes = random_codes(2, seed=70)
    assert torch.equal(codec.decode(loaded, codes), codec.decode(codec.load_mimi(saved_dir), codes))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoder_replays_like_eager(mimi: codec.MimiModel) -> None:
    """Every graph size captured at warm-up; replays with random row masks, resets and leading-row
    calls (past the 250-step ring) equal an eager decoder's on the same model and inputs."""
    model = copy.deepcopy(mimi).cuda()
    g = torch.Generator().manual_seed(8)
    with (
        MimiStreamDecoder(model, batch_size=4, graph_sizes=[2, 4]) as graphed,
        MimiStreamDecoder(model, batch_size=4, graph_sizes=[2, 4], cuda_graphs=False) as eager,
    ):
        graphed.warm_up()
        eager.warm_up()
        assert graphed.captured_sizes == [2, 4]
        assert eager.captured_sizes == []
        for step in range(140):
            rows = 2 if step % 3 == 0 else 4
            codes = torch.randint(0, CODEBOOK_SIZE, (rows, NUM_CODEBOOKS), generator=g).cuda()
            active = (torch.rand(rows, generator=g) < 0.8).cuda()
            reset = [r for r in range(4) if torch.rand(1, generator=g).item() < 0.05]
            if reset:
                graphed.reset(reset)
                eager.reset(reset)
            got = graphed.decode(codes, active, validate=False)
            want = eager.decode(codes, active, validate=False)
            assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
