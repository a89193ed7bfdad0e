"""The audio frontend: frame counts, fsd_fed's patch rules, features equal to direct torchaudio output."""

import numpy as np
import pytest
import torch
import torchaudio
from fsd_tree import tone

from fl.config import CONFIG_DIR, FrontendConfig, load_config
from fl.dsp import StreamingResampler, sinc_resample_kernel
from fl.frontend import DecimatingResampler, Frontend, cut_patches, n_segments, patch_frame_indices

CONFIG = FrontendConfig()
PATCH, HOP = 101, 50


def reference_patches(frames: np.ndarray) -> np.ndarray:
    """fsd_fed's rules written out plainly: tile short clips to 101 frames; patches every 50 frames, their
    count int(n / 50) - 1 (at least 1); a patch one frame short repeats its last frame."""
    n = len(frames)
    if n < PATCH:
        tiled = np.concatenate([frames] * -(-PATCH // n))[:PATCH]
        return tiled[None]
    patches = []
    for segment in range(max(1, int(n / HOP) - 1)):
        patch = frames[segment * HOP : segment * HOP + PATCH]
        if len(patch) == PATCH - 1:
            patch = np.concatenate([patch, patch[-1:]])
        assert len(patch) == PATCH, "a patch may be at most one frame short"
        patches.append(patch)
    return np.stack(patches)


def numbered_frames(n: int, n_mels: int = 3) -> np.ndarray:
    """Frames whose every value is the frame's own index, so a patch shows which frames it took."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], n_mels, axis=1)


# seconds at 44.1 kHz -> (frames at 22.05 kHz with hop 220, centered: 1 + samples // 220, patches)
CLIPS = {0.3: (31, 1), 1.0: (101, 1), 1.5: (151, 2), 30.0: (3007, 59)}


@pytest.fixture(scope="module")
def frontend() -> Frontend:
    return Frontend(CONFIG)


@pytest.mark.parametrize("seconds", sorted(CLIPS))
def test_hand_made_clips_give_the_rule_patch_counts_and_contents(frontend, seconds):
    expected_frames, expected_patches = CLIPS[seconds]
    frames = frontend.frames(tone(seconds, seed=int(seconds * 10)), 44100)
    assert frames.shape == (expected_frames, 96) and frames.dtype == np.float32
    assert frontend.n_frames(int(round(seconds * 22050))) == expected_frames
    assert n_segments(len(frames), CONFIG) == expected_patches
    patches = cut_patches(frames, CONFIG)
    assert patches.shape == (expected_patches, PATCH, 96) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches, reference_patches(frames))


@pytest.mark.parametrize("n", [1, 31, 100, 101, 149, 150, 151, 199, 200, 3007])
def test_patch_frames_follow_the_rules(n):
    patches = cut_patches(numbered_frames(n), CONFIG)
    np.testing.assert_array_equal(patches, reference_patches(numbered_frames(n)))
    starts = patches[:, 0, 0]
    if n >= PATCH:
        np.testing.assert_array_equal(starts, np.arange(len(patches)) * HOP)


def test_short_clip_is_tiled_and_a_one_frame_short_patch_repeats_its_last_frame():
    short = cut_patches(numbered_frames(31), CONFIG)[0, :, 0]
    np.testing.assert_array_equal(short, np.arange(PATCH) % 31)
    last = cut_patches(numbered_frames(150), CONFIG)[-1, :, 0]  # frames 50..149, then 149 again
    np.testing.assert_array_equal(last, np.r_[np.arange(50, 150), 149])


def test_patch_frame_indices_address_clips_inside_one_frame_array():
    lengths = [31, 151, 3007, 101]
    clips = [numbered_frames(n) + 10_000 * k for k, n in enumerate(lengths)]
    store = np.concatenate(clips)
    offsets = np.cumsum([0, *lengths[:-1]])
    counts = [n_segments(n, CONFIG) for n in lengths]
    rows = [(k, s) for k, c in enumerate(counts) for s in range(c)]
    clip, segment = np.array(rows).T
    idx = patch_frame_indices(offsets[clip], np.array(lengths)[clip], segment, CONFIG)
    np.testing.assert_array_equal(store[idx], np.concatenate([cut_patches(c, CONFIG) for c in clips]))


def test_linear_features_equal_fsd_fed_torchaudio_computation():
    wave = np.stack([tone(2.0, seed=1), tone(2.0, freq=3000.0, seed=2)]).mean(axis=0)
    ours = Frontend(FrontendConfig(scale="linear", store_dtype="float32")).frames(wave, 44100)
    signal = torchaudio.transforms.Resample(44100, 22050)(torch.from_numpy(wave))
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=22050, n_fft=660, hop_length=220, n_mels=96)
    expected = mel(signal).T.numpy()
    assert ours.shape == expected.shape == (201, 96)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_log_scale_is_the_floored_log_of_linear():
    wave = tone(0.5, seed=3)
    wave[:4000] = 0.0  # digital silence hits the floor
    linear = Frontend(FrontendConfig(scale="linear", store_dtype="float32")).frames(wave, 44100)
    log = Frontend(CONFIG).frames(wave, 44100)
    np.testing.assert_allclose(log, np.log(np.maximum(linear, CONFIG.log_floor)), rtol=1e-5, atol=1e-5)
    assert log.min() == pytest.approx(np.log(CONFIG.log_floor))


def test_frame_levels_follow_the_signal_in_db_on_either_scale():
    rng = np.random.default_rng(5)
    wave = rng.normal(0.0, 0.01, 44100).astype(np.float32)
    wave[22050:] *= 10.0  # the second half 20 dB louder
    linear = Frontend(FrontendConfig(scale="linear", store_dtype="float32"))
    log = Frontend(CONFIG)
    levels = log.levels_db(log.frames(wave, 44100))
    assert levels.shape == (101,) and levels.dtype == np.float32
    np.testing.assert_allclose(levels, linear.levels_db(linear.frames(wave, 44100)), atol=1e-3)
    assert np.median(levels[60:]) - np.median(levels[:40]) == pytest.approx(20.0, abs=0.5)


def test_frontend_at_its_own_rate_skips_resampling():
    wave = tone(1.0, rate=22050, seed=4)
    frames = Frontend(CONFIG).frames(wave, 22050)
    direct = torchaudio.transforms.MelSpectrogram(sample_rate=22050, n_fft=660, hop_length=220, n_mels=96)
    expected = np.log(np.maximum(direct(torch.from_numpy(wave)).T.numpy(), CONFIG.log_floor))
    np.testing.assert_allclose(frames, expected, rtol=1e-5, atol=1e-5)


def test_lea16k_features_have_64_bands_at_100_frames_per_second():
    config = load_config(CONFIG_DIR / "features" / "lea16k.toml").frontend
    assert (config.sample_rate, config.n_mels, 1 / config.frame_s) == (16000, 64, 100.0)
    frontend = Frontend(config)
    assert frontend.frames(tone(1.0, rate=16000), 16000).shape == (101, 64)
    from_44k = frontend.frames(tone(1.5), 44100)
    assert from_44k.shape == (151, 64)
    assert cut_patches(from_44k, config).shape == (2, 101, 64)


def test_frontend_rejects_multichannel_input():
    with pytest.raises(ValueError, match="mono"):
        Frontend(CONFIG).frames(np.zeros((100, 2), np.float32), 44100)


@pytest.mark.parametrize("orig, new", [(44100, 22050), (48000, 16000), (32000, 16000), (16000, 8000)])
@pytest.mark.parametrize("seconds", [0.02, 0.37, 1.1])  # under one block, several blocks (8192 outputs each)
def test_decimating_resampler_equals_torchaudio_resample(orig, new, seconds):
    wave = torch.from_numpy(tone(seconds, rate=orig, seed=orig % 97))
    expected = torchaudio.transforms.Resample(orig, new)(wave)
    ours = DecimatingResampler(orig, new)(wave)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-6)


def test_frontend_resamples_other_ratios_with_torchaudio():
    wave = tone(0.5, rate=48000, seed=5)
    signal = torchaudio.transforms.Resample(48000, 22050)(torch.from_numpy(wave))
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=22050, n_fft=660, hop_length=220, n_mels=96)
    expected = np.log(np.maximum(mel(signal).T.numpy(), CONFIG.log_floor))
    np.testing.assert_allclose(Frontend(CONFIG).frames(wave, 48000), expected, rtol=1e-5, atol=1e-5)


def test_decimating_resampler_refuses_a_ratio_that_is_not_whole():
    with pytest.raises(ValueError, match="not a whole multiple"):
        DecimatingResampler(48000, 22050)


def test_too_short_waveform_is_refused_with_its_length():
    with pytest.raises(ValueError, match="300 samples at 22050 Hz is too short"):
        Frontend(CONFIG).frames(np.zeros(300, np.float32), 22050)


def test_the_shortest_waveform_is_min_samples_for_the_frontend_and_for_prep():
    from data_prep.prep import ClipError, _check_length

    n = CONFIG.min_samples
    assert Frontend(CONFIG).frames(np.ones(n, np.float32), CONFIG.sample_rate).shape == (1 + n // CONFIG.hop_length,
                                                                                        CONFIG.n_mels)
    _check_length(n, CONFIG.sample_rate, CONFIG)
    with pytest.raises(ValueError, match=f"needs at least {n}"):
        Frontend(CONFIG).frames(np.ones(n - 1, np.float32), CONFIG.sample_rate)
    with pytest.raises(ClipError, match=f"needs at least {n} samples"):
        _check_length(n - 1, CONFIG.sample_rate, CONFIG)


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (48000, 16000), (44100, 22050), (48000, 22050),
                                           (16000, 16000 * 3)])
def test_streaming_resampler_equals_the_offline_resampler_for_any_blocks(orig: int, new: int) -> None:
    """A microphone at its own rate, resampled block by block, gives the offline frontend's samples."""
    rng = np.random.default_rng(orig + new)
    wave = (0.3 * rng.standard_normal(orig + 777)).astype(np.float32)
    config = FrontendConfig(sample_rate=new, n_fft=400, hop_length=160, n_mels=32)
    offline = Frontend(config).resample(torch.from_numpy(wave), orig).numpy()
    stream = StreamingResampler(orig, new)
    pieces, start = [], 0
    for size in rng.integers(1, 3000, size=100):
        pieces.append(stream.process(wave[start : start + size]))
        start += size
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-6)


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (48000, 22050), (22050, 16000), (8000, 16000)])
def test_the_numpy_resampling_kernel_is_torchaudios(orig: int, new: int) -> None:
    reference = torchaudio.transforms.Resample(orig, new)
    kernel, width, _, _ = sinc_resample_kernel(orig, new)
    assert width == reference.width
    np.testing.assert_array_equal(kernel, reference.kernel[:, 0].numpy())
