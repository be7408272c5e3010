"""Audio features in numpy: white noise at a signal-to-noise ratio, log-mel filterbanks and per-utterance
normalisation (host-side; used once, when a speech data set is generated)."""

from __future__ import annotations

import functools

import numpy as np


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` dB below the signal's mean power.

    Args:
      samples: ``[N]`` audio (any real dtype; treated as float64).
      snr_db: signal-to-noise ratio in dB (``10 log10(P_signal / P_noise)``).
      rng: numpy generator (the only source of randomness).

    Returns:
      ``[N]`` float64 ``samples + noise``.
    """
    x = np.asarray(samples, np.float64)
    power = np.mean(np.square(x)) if x.size else 0.0
    return x + rng.standard_normal(x.shape) * np.sqrt(power / 10.0 ** (snr_db / 10.0))


def trim_silence(samples: np.ndarray, rate: int, *, threshold: float = 0.01, margin_ms: float = 50.0) -> np.ndarray:
    """Drops the leading and trailing samples quieter than ``threshold`` times the peak, keeping ``margin_ms``.

    Returns ``samples`` unchanged when it is all silent.
    """
    mag = np.abs(np.asarray(samples, np.float64))
    loud = np.flatnonzero(mag > threshold * mag.max()) if mag.size and mag.max() > 0 else np.zeros(0, int)
    if loud.size == 0:
        return samples
    margin = int(rate * margin_ms / 1000)
    return samples[max(loud[0] - margin, 0): loud[-1] + margin + 1]


def hz_to_mel(f):
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(n_mels: int, n_fft: int, rate: int, f_min: float, f_max: float) -> np.ndarray:
    """``[n_fft // 2 + 1, n_mels]`` triangular filters, equally spaced on the mel scale between ``f_min`` and
    ``f_max`` Hz, each peaking at 1 (read-only array)."""
    if not 0 <= f_min < f_max <= rate / 2:
        raise ValueError(f"mel filterbank: need 0 <= f_min < f_max <= rate / 2 = {rate / 2}, got {f_min}, {f_max}")
    freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    fb = np.maximum(0.0, np.minimum(up, down))
    fb.setflags(write=False)
    return fb


def log_mel(samples: np.ndarray, rate: int, **options) -> np.ndarray:
    """Log-mel filterbank energies of one utterance: ``[frames, n_mels]`` float64 (see :func:`log_mel_many`)."""
    return log_mel_many([samples], rate, **options)[0]


def log_mel_many(signals, rate: int, *, n_mels: int = 40, win_ms: float = 25.0, hop_ms: float = 10.0,
                 f_min: float = 20.0, f_max: float = 8000.0, preemphasis: float = 0.97) -> list[np.ndarray]:
    """Log-mel filterbank energies of several utterances, computed in one FFT and one product for speed.

    Per utterance: pre-emphasis, Hann-windowed frames of ``win_ms`` every ``hop_ms`` (the last partial frame
    zero-padded), power spectrum (FFT of the next power of two), ``n_mels`` triangular mel filters,
    ``log(energy + 1e-10)``.

    Args:
      signals: utterances, each ``[N_i]`` samples (any scale).
      rate: sample rate in Hz.

    Returns:
      One ``[frames_i, n_mels]`` float64 array per utterance with ``frames_i = 1 + ceil(max(N_i - win, 0) / hop)``
      (at least one frame).
    """
    win, hop = int(round(rate * win_ms / 1000)), int(round(rate * hop_ms / 1000))
    frames, counts = [], []
    for samples in signals:
        x = np.asarray(samples, np.float64)
        x = np.concatenate([x[:1], x[1:] - preemphasis * x[:-1]]) if x.size else np.zeros(1)
        n = 1 + -(-max(x.size - win, 0) // hop)
        x = np.pad(x, (0, (n - 1) * hop + win - x.size))
        frames.append(x[np.arange(win)[None, :] + hop * np.arange(n)[:, None]])
        counts.append(n)
    n_fft = 1 << (win - 1).bit_length()
    spec = np.fft.rfft(np.concatenate(frames) * np.hanning(win)[None, :], n=n_fft)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    fb = mel_filterbank(n_mels, n_fft, rate, f_min, f_max).astype(np.float32)
    out = np.log((power @ fb).astype(np.float64) + 1e-10)
    return np.split(out, np.cumsum(counts)[:-1])


def normalise(features: np.ndarray) -> np.ndarray:
    """Per-utterance normalisation: each feature column of ``[frames, F]`` to zero mean and unit variance (a
    constant column becomes 0). Returns ``[frames, F]`` float64."""
    f = np.asarray(features, np.float64)
    std = f.std(axis=0, keepdims=True)
    return (f - f.mean(axis=0, keepdims=True)) / np.where(std > 1e-8, std, 1.0)
