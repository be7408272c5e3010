"""The eSpeak NG speech synthesiser through ``ctypes``, from the ``espeakng-loader`` wheel (it bundles
``libespeak-ng`` and its voice data, so no system package is needed): ``pip install 'jbptt[speech]'``.

eSpeak NG keeps global state in the library (the pitch-flutter phase, the waveform phase, its random generator),
so what it renders depends on everything it rendered before in the process. A :class:`Synthesizer` therefore
loads a **fresh instance** of the library (and unloads it on ``close``): the same sequence of utterances from a
fresh instance with the same seed gives the same samples, bit for bit. The library runs in synchronous mode
(``AUDIO_OUTPUT_SYNCHRONOUS``): :meth:`Synthesizer.say` returns once the utterance is rendered, the synth
callback having collected its 16-bit samples (22,050 Hz). One synthesiser may be open at a time per process
(opening a second one raises a ``RuntimeError``).
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import os
import threading

import numpy as np

INSTALL = "pip install 'jbptt[speech]'"
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_RATE, ESPEAK_PITCH = 1, 3  # espeak_PARAMETER
RATE_RANGE, PITCH_RANGE = (80, 450), (0, 100)  # words per minute; pitch 0-100 (eSpeak's limits)

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_OPEN = threading.Lock()  # held while a Synthesizer is open: the library's state is per process


def _loader():
    try:
        import espeakng_loader
    except ImportError:
        raise ImportError(f"the speech tasks need the eSpeak NG wheel espeakng-loader: {INSTALL}") from None
    return espeakng_loader


@functools.lru_cache(maxsize=1)
def variants() -> tuple[str, ...]:
    """Names of the voice variants shipped with the data (``m1`` ... ``f5``, ``Andy`` ...), sorted."""
    return tuple(sorted(os.listdir(os.path.join(_loader().get_data_path(), "voices", "!v"))))


class Synthesizer:
    """A freshly loaded eSpeak NG instance; a context manager (``with Synthesizer(seed) as synth: ...``).

    Args:
      seed: seed of eSpeak's random generator (breathiness and other noise of some voices).

    Raises:
      ImportError: espeakng-loader is not installed (names the pip command).
      RuntimeError: the library did not initialise.
    """

    def __init__(self, seed: int = 0):
        self.lib, self._holds = None, False
        loader = _loader()
        self.data_path = loader.get_data_path()
        if not _OPEN.acquire(blocking=False):
            raise RuntimeError("espeak: another Synthesizer is open in this process; close it first (the library's "
                               "state is global, so one instance at a time)")
        self._holds = True
        try:
            lib = ctypes.CDLL(loader.get_library_path())
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                         ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            self.lib = lib
            self.rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
            if self.rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed (returned {self.rate}) with data at {self.data_path}")
            self._chunks: list[np.ndarray] = []
            self._callback = _CALLBACK(self._collect)  # kept referenced: the library holds the pointer
            lib.espeak_SetSynthCallback(self._callback)
            lib.espeak_ng_SetRandSeed(int(seed) % 2**31)
        except BaseException:
            self.close()
            raise

    def _collect(self, wav, n, event):
        if n > 0 and wav:
            self._chunks.append(np.frombuffer(ctypes.string_at(wav, 2 * n), np.int16))
        return 0

    def say(self, text: str, *, voice: str = "en", variant: str | None = None, rate: int = 175,
            pitch: int = 50) -> np.ndarray:
        """Renders ``text``.

        Args:
          text: what to say (plain text).
          voice: a language voice (``"en"``, ``"en-us"`` ...).
          variant: a voice variant from :func:`variants` (``"m3"``, ``"f2"`` ...), or None for the plain voice.
          rate: speaking rate in words per minute, in ``[80, 450]``.
          pitch: base pitch in ``[0, 100]`` (50 is the voice's normal pitch).

        Returns:
          ``[N]`` int16 samples at ``self.rate`` Hz.

        Raises:
          ValueError: an unknown voice or variant, or a rate or pitch outside eSpeak's range.
        """
        if self.lib is None:
            raise RuntimeError("espeak: this Synthesizer is closed")
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1] or not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise ValueError(f"espeak: rate {rate} must be in {RATE_RANGE} and pitch {pitch} in {PITCH_RANGE}")
        if variant is not None and variant not in variants():
            raise ValueError(f"espeak: unknown voice variant {variant!r}; choose from {variants()}")
        name = voice if variant is None else f"{voice}+{variant}"
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"espeak: unknown voice {voice!r}")
        self.lib.espeak_SetParameter(ESPEAK_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(ESPEAK_PITCH, int(pitch), 0)
        data = text.encode() + b"\0"
        self._chunks = []
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, 0, None, None)
        chunks, self._chunks = self._chunks, []
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} for {text!r} in voice {name!r}")
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def close(self) -> None:
        """Terminates and unloads the library instance (idempotent)."""
        lib, self.lib = self.lib, None
        if lib is not None:
            lib.espeak_Terminate()
            handle = lib._handle
            del lib
            unload = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
            if unload is not None:
                unload(handle)
        if getattr(self, "_holds", False):
            self._holds = False
            _OPEN.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
