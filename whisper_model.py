"""Whisper, all of it in this single file: audio front end, encoder-decoder, and decoding.

    audio file ─► load_audio (mono, 16 kHz) ─► pad_or_trim (30 s) ─► log_mel_spectrogram (n_mels, 3000)
        ─► AudioEncoder: conv1d+GELU, conv1d(stride 2)+GELU, sinusoidal positions, pre-LN blocks, ln_post
        ─► audio features (B, 1500, n_audio_state)
    tokens ─► TextDecoder: token + learned positions, blocks of self-attention (causal, KV cache),
        cross-attention to the audio (its keys/values computed once per utterance), MLP ─► ln ─► x @ Eᵀ

Decoding is composed from small pieces, as in openai-whisper's decoding.py: `Inference` owns the KV cache,
logit filters suppress blank/non-speech tokens, and two strategies sit on top: greedy (`decode_greedy`) and
the sampled n-best list of Whispering-LLaMA (`sample_nbest`: 200 samples at a temperature drawn from
[0.7, 0.8], deduplicated, the 15 most likely kept).

References: Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (arXiv 2212.04356);
Radhakrishnan et al., "Whispering LLaMA" (EMNLP 2023, arXiv 2310.06434) for the n-best recipe.

Module and parameter names follow openai-whisper's state dict (encoder.blocks.0.attn.query, ...), so its
.pt checkpoints load with no renaming; convert_checkpoint.py turns every other format into this one, and
its `load_whisper` turns a model name into a loaded model. The command line is transcribe.py:

    python transcribe.py --audio x.wav              # greedy transcript
    python transcribe.py --audio x.wav --nbest 15   # ranked n-best list with total log-probabilities
"""
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from storage import ProjectError, check_exact_state, empty_init, read_safetensors

# ----------------------------------------------------------------------------------------------------
# Audio front end: pure functions
# ----------------------------------------------------------------------------------------------------

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30  # seconds of audio per model input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames; the encoder's stride-2 conv halves them
N_SAMPLES_PER_FRAME = 2 * HOP_LENGTH  # 320: audio samples behind one encoder frame (one audio "token")
FRAMES_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_FRAME  # 50 encoder frames per second
N_AUDIO_FRAMES = N_SAMPLES // N_SAMPLES_PER_FRAME  # 1500 encoder frames per 30 s window (n_audio_ctx)
SILENCE_PEAK = 1e-4  # -80 dBFS: a file whose loudest sample is below this holds no speech
MIN_SECONDS = 0.1  # shorter than a syllable: nothing to transcribe


class AudioError(ProjectError):
    """An audio input that cannot be transcribed: missing, unreadable, empty or silent."""


def resample(audio: np.ndarray, orig_sr: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with libsoxr (HQ: its anti-aliasing low-pass keeps what lies below the
    new Nyquist frequency and removes what would fold back)."""
    import soxr

    if orig_sr == sr:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio.astype(np.float32, copy=False), orig_sr, sr, quality="HQ").astype(np.float32)


def load_audio(path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read any file libsndfile reads (wav, flac, ogg, mp3 where supported), mix to mono, resample to `sr`.
    Returns float32 samples in [-1, 1]. Raises AudioError (one line) for anything that is not usable speech."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes), not audio")
    try:
        data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except Exception as e:  # libsndfile reports unknown formats, truncated headers etc. as several types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r"^Error opening .*?: ", "", reason)  # libsndfile repeats the path; it leads the line
        raise AudioError(f"{path}: not a readable audio file ({reason})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: audio is empty (zero samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if data.shape[0] < MIN_SECONDS * file_sr:
        # Whisper still writes something for a click ("you", "Thank you."): a hallucination, not a transcript
        raise AudioError(f"{path}: audio is {data.shape[0] / file_sr:.3f} s long, too short to transcribe "
                         f"(at least {MIN_SECONDS} s)")
    audio = resample(data.mean(axis=1), file_sr, sr)
    if np.abs(audio).max() < SILENCE_PEAK:
        raise AudioError(f"{path}: audio is silent (peak below -80 dBFS)")
    return audio


def pad_or_trim(audio, length: int = N_SAMPLES, axis: int = -1):
    """Zero-pad or cut the last axis to `length` samples (numpy array or torch tensor)."""
    n = audio.shape[axis]
    if torch.is_tensor(audio):
        if n > length:
            return audio.index_select(axis, torch.arange(length, device=audio.device))
        if n < length:
            pad = [0, 0] * audio.dim()
            pad[2 * (audio.dim() - 1 - axis % audio.dim()) + 1] = length - n  # F.pad counts from the last axis
            return F.pad(audio, pad)
        return audio
    if n > length:
        return audio.take(np.arange(length), axis=axis)
    if n < length:
        widths = [(0, 0)] * audio.ndim
        widths[axis] = (0, length - n)
        return np.pad(audio, widths)
    return audio


def encoder_frames(n_samples: int) -> int:
    """Encoder frames that carry audio for a clip of n_samples (ceil(n / 320): a 3 s clip fills 150 of 1500)."""
    return math.ceil(n_samples / N_SAMPLES_PER_FRAME)


def windows(audio):
    """Consecutive 30 s windows of a long recording (the last one shorter): how audio over 30 s is decoded."""
    return [audio[i:i + N_SAMPLES] for i in range(0, len(audio), N_SAMPLES)]


def hz_to_mel(f):
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3  # 66.67 Hz per mel in the linear part
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0  # 27 mels per factor 6.4 in frequency
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int = 80, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Triangular mel filterbank (n_mels, 1 + n_fft // 2), the same matrix as librosa.filters.mel(sr, n_fft,
    n_mels) with its defaults (fmin 0, fmax sr/2, Slaney scale, Slaney normalisation), which Whisper used.

    n_mels + 2 points evenly spaced in mel give the left edge, centre and right edge of each triangle;
    Slaney normalisation divides each triangle by its width in Hz so every filter has the same area."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    widths = np.diff(mel_pts)  # (n_mels + 1,)
    ramps = mel_pts[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freqs)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.flags.writeable = False  # cached: shared by every caller
    return weights


def log_mel_spectrogram(audio, n_mels: int = 80, device=None) -> torch.Tensor:
    """Whisper's log-mel input: (n_mels, 3000) for a 1-D clip of up to 30 s, or (B, n_mels, 3000) for (B, N).

    Shorter audio is zero-padded to 30 s. Longer audio is an error: the caller splits it into 30 s windows
    (cutting it here would silently drop speech)."""
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio)
    audio = audio.to(device=device, dtype=torch.float32)
    if audio.shape[-1] == 0:
        raise AudioError("audio is empty (zero samples)")
    if audio.shape[-1] > N_SAMPLES:
        raise AudioError(f"audio is {audio.shape[-1] / SAMPLE_RATE:.1f} s long; split it into windows of at "
                         f"most {CHUNK_LENGTH} s first")
    audio = pad_or_trim(audio, N_SAMPLES)
    window = torch.hann_window(N_FFT, periodic=True, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # centred, reflect-padded
    power = stft[..., :-1].abs() ** 2  # (…, 201, 3000): the last frame only sees the padding
    filters = torch.tensor(mel_filters(n_mels), device=audio.device)
    mel = filters @ power  # (…, n_mels, 3000)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    # keep 8 decades (80 dB) below each clip's loudest bin, then scale to roughly [-1, 1]
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelDimensions:
    """Every shape of a Whisper model; the field names are openai-whisper's checkpoint["dims"] keys."""
    n_mels: int = 80
    n_audio_ctx: int = 1500  # encoder positions (3000 mel frames after the stride-2 conv)
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51864
    n_text_ctx: int = 448  # decoder positions
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4

    @classmethod
    def from_name(cls, name: str) -> "ModelDimensions":
        if name not in WHISPER_DIMS:
            raise ValueError(f"unknown Whisper model {name!r}; known: {', '.join(WHISPER_DIMS)}")
        return cls(**WHISPER_DIMS[name])

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= 51865  # the English-only GPT-2 vocabulary has 51864 entries


def _dims(width, heads, layers, vocab=51865, mels=80, text_layers=None):
    return dict(n_mels=mels, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads, n_audio_layer=layers,
                n_vocab=vocab, n_text_ctx=448, n_text_state=width, n_text_head=heads,
                n_text_layer=layers if text_layers is None else text_layers)


# The released models (openai-whisper's checkpoints["dims"]).
WHISPER_DIMS = {
    "tiny.en": _dims(384, 6, 4, vocab=51864),
    "tiny": _dims(384, 6, 4),
    "base.en": _dims(512, 8, 6, vocab=51864),
    "base": _dims(512, 8, 6),
    "small.en": _dims(768, 12, 12, vocab=51864),
    "small": _dims(768, 12, 12),
    "medium.en": _dims(1024, 16, 24, vocab=51864),
    "medium": _dims(1024, 16, 24),
    "large-v1": _dims(1280, 20, 32),
    "large-v2": _dims(1280, 20, 32),
    "large-v3": _dims(1280, 20, 32, vocab=51866, mels=128),  # one more language token, 128 mel bins
    "large-v3-turbo": _dims(1280, 20, 32, vocab=51866, mels=128, text_layers=4),  # a 4-layer decoder
}
WHISPER_DIMS["large"] = WHISPER_DIMS["large-v3"]
WHISPER_DIMS["turbo"] = WHISPER_DIMS["large-v3-turbo"]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """The encoder's fixed positions (length, channels): sin of geometric frequencies in the first half of
    the channels, cos in the second half."""
    assert channels % 2 == 0
    increment = math.log(max_timescale) / (channels // 2 - 1)
    # on the CPU even while a model is built on the meta device (storage.empty_init): a formula, not a weight
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float64, device="cpu"))
    scaled = torch.arange(length, dtype=torch.float64, device="cpu")[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activations' dtype (half precision loses the variance)."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def attend_grouped(q, k, v, groups):
    """Cross-attention of many decoder rows to few audio clips, without copying the audio's keys/values.

    q: (R, H, T, D) queries of R rows; k, v: (A, H, F, D) for A clips; groups: how many consecutive rows
    read each clip (sum R; rows are clip-major). Cross-attention has no mask, so the rows that read one clip
    can be stacked along the query axis: one (1, H, g·T, D) query block per clip. 200 n-best samples of one
    clip then cost one attention call against a single copy of its (H, F, D) keys/values."""
    R, H, T, D = q.shape
    A = k.shape[0]
    if groups is None or (len(set(groups)) == 1 and groups[0] * A == R):
        g = R // A
        qs = q.view(A, g, H, T, D).transpose(1, 2).reshape(A, H, g * T, D)
        y = F.scaled_dot_product_attention(qs, k, v)
        return y.view(A, H, g, T, D).transpose(1, 2).reshape(R, H, T, D)
    outs = []  # unequal groups (finished rows dropped): one call per clip that still has rows
    for a, (qa, g) in enumerate(zip(torch.split(q, groups), groups)):
        if g:
            y = F.scaled_dot_product_attention(qa.transpose(0, 1).reshape(1, H, g * T, D), k[a:a + 1], v[a:a + 1])
            outs.append(y.view(H, g, T, D).transpose(0, 1))
    return torch.cat(outs)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # a key bias shifts every score of a query equally
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def heads(self, x):  # (B, T, W) -> (B, H, T, D)
        B, T, W = x.shape
        return x.view(B, T, self.n_head, W // self.n_head).transpose(1, 2)

    def key_value(self, x):
        """Keys and values of x in head layout; for cross-attention computed once per clip and cached."""
        return self.heads(self.key(x)), self.heads(self.value(x))

    def forward(self, x, kv=None, cache=None, causal=False, groups=None):
        """x (B, T, W) → (B, T, W).

        kv: precomputed (k, v) to attend to (cross-attention); None → self-attention on x.
        cache: for self-attention while decoding, a `SelfAttentionCache` slot that holds the keys/values
        of earlier positions and receives x's. groups: see `attend_grouped`."""
        q = self.heads(self.query(x))
        B, H, T, D = q.shape
        if kv is not None:
            y = attend_grouped(q, *kv, groups)
        else:
            k, v = self.key_value(x)
            if cache is not None:
                k, v = cache.append(k, v)
            S = k.shape[2]
            if not causal or T == 1:  # one new token attends to everything cached before it
                y = F.scaled_dot_product_attention(q, k, v)
            elif S == T:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # T new tokens after S - T cached ones: query t sees keys up to S - T + t
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        n_mlp = 4 * n_state  # Whisper's MLP is 4× wide
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x, cross_kv=None, cache=None, causal=False, groups=None):
        x = x + self.attn(self.attn_ln(x), cache=cache, causal=causal)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_attn_ln(x), kv=cross_kv, groups=groups)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))  # saved: checkpoints carry it
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def forward(self, mel):
        """mel (B, n_mels, 2·n_ctx) → audio features (B, n_ctx, n_state)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, n_ctx, n_state)
        if x.shape[1:] != self.positional_embedding.shape:
            raise ValueError(f"encoder expects {2 * self.positional_embedding.shape[0]} mel frames with "
                             f"{self.conv1.in_channels} bins, got mel of shape {tuple(mel.shape)}")
        x = x + self.positional_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class SelfAttentionCache:
    """Keys/values of the positions a decoder block has already seen, (R, H, t, D), one per block.
    Stored in a buffer whose length doubles when full, so appending a token does not copy the past."""

    def __init__(self):
        self.k = self.v = None  # (R, H, capacity, D) buffers
        self.length = 0

    def append(self, k, v):
        T = k.shape[2]
        if self.k is None or self.length + T > self.k.shape[2]:
            capacity = max(16, 2 * (self.length + T))
            new_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            new_v = torch.empty_like(new_k)
            if self.k is not None:
                n = self.length
                new_k[:, :, :n], new_v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def select(self, rows):
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class DecoderCache:
    """Everything the decoder reuses between steps: per block, the self-attention keys/values so far and the
    cross-attention keys/values of the audio (computed once per clip, shared by all rows reading it)."""

    def __init__(self, cross_kv, rows_per_clip):
        self.cross_kv = cross_kv  # list over blocks of (k, v), each (A, H, F, D)
        self.self_kv = [SelfAttentionCache() for _ in cross_kv]
        self.clip_of_row = torch.arange(len(rows_per_clip)).repeat_interleave(torch.tensor(rows_per_clip))
        self.groups = list(rows_per_clip)
        self.offset = 0  # tokens already fed

    def select(self, rows):
        """Keep (and duplicate) decoder rows; rows must stay clip-major (a prefix whose samples split into
        several continuations is copied in place, next to its clip's other rows)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(rows) == len(self.clip_of_row) and bool((rows.cpu() == torch.arange(len(rows))).all()):
            return  # every row stays where it is: nothing to copy
        clips = self.clip_of_row[rows.cpu()]
        assert bool((clips[1:] >= clips[:-1]).all()), "decoder rows must stay grouped by clip"
        for c in self.self_kv:
            c.select(rows.to(c.k.device) if c.k is not None else rows)
        self.clip_of_row = clips
        self.groups = torch.bincount(clips, minlength=len(self.groups)).tolist()


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(n_ctx, n_state), std=0.01))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True)
                                     for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)

    def cross_kv(self, audio_features):
        """Each block's cross-attention keys/values of the audio: list of (k, v), each (A, H, F, D)."""
        return [b.cross_attn.key_value(audio_features) for b in self.blocks]

    def new_cache(self, audio_features, rows_per_clip=None) -> DecoderCache:
        A = audio_features.shape[0]
        return DecoderCache(self.cross_kv(audio_features), rows_per_clip or [1] * A)

    def forward(self, tokens, audio_features=None, cache: Optional[DecoderCache] = None):
        """tokens (R, T) → logits (R, T, n_vocab), float32.

        Without a cache: the whole sequence from position 0, attending to audio_features (R, F, W).
        With a cache: `tokens` are the next T tokens after cache.offset; the audio comes from the cache."""
        offset = cache.offset if cache is not None else 0
        T = tokens.shape[1]
        if offset + T > self.positional_embedding.shape[0]:
            raise ValueError(f"{offset + T} tokens exceed the decoder's {self.positional_embedding.shape[0]} positions")
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + T]
        x = x.to(self.ln.weight.dtype)
        for i, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, block.cross_attn.key_value(audio_features), causal=True)
            else:
                x = block(x, cache.cross_kv[i], cache.self_kv[i], causal=True, groups=cache.groups)
        if cache is not None:
            cache.offset += T
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()  # output tied to the embedding


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)

    def embed_audio(self, mel):
        """mel (B, n_mels, 3000) → audio features (B, n_audio_ctx, n_audio_state)."""
        return self.encoder(mel.to(self.encoder.conv1.weight.dtype))

    def forward(self, mel, tokens):
        return self.decoder(tokens, self.embed_audio(mel))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, device="cpu", dtype=torch.float32) -> "Whisper":
        """Load a folder in this project's format (config.json + model.safetensors)."""
        d = Path(checkpoint_dir)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found; convert a checkpoint with convert_checkpoint.py")
        try:
            dims = ModelDimensions(**json.loads((d / "config.json").read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{d / 'config.json'} is not a Whisper config ({e})") from None
        with empty_init():
            model = cls(dims)
        state = read_safetensors(d / "model.safetensors")  # one-line error for a damaged file
        check_exact_state(model, state, where=str(d / "model.safetensors"))
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------------
# Decoding: inference wrapper, logit filters, strategies
# ----------------------------------------------------------------------------------------------------


class Inference:
    """Owns the KV cache of one decoding run: computes the audio's cross-attention keys/values once, then
    feeds the decoder only the tokens it has not seen. Rows are clip-major: `rows_per_clip` rows per clip."""

    def __init__(self, model: Whisper, audio_features, rows_per_clip: int = 1):
        self.model = model
        self.cache = model.decoder.new_cache(audio_features, [rows_per_clip] * audio_features.shape[0])

    def logits(self, tokens):
        """tokens (R, T) — the whole sequence so far → logits of its last position (R, n_vocab)."""
        return self.model.decoder(tokens[:, self.cache.offset:], cache=self.cache)[:, -1]

    def select(self, rows):
        """Keep/duplicate rows: a prefix whose samples split is copied, finished samples are dropped."""
        self.cache.select(rows)


class SuppressBlank:
    """At the first sampled position forbid a lone space and end-of-text: a transcript does not start empty."""

    def __init__(self, tokenizer, sample_begin: int):
        self.ids = list(tokenizer.encode(" ")) + [tokenizer.eot]
        self.sample_begin = sample_begin

    def apply(self, logits, tokens):
        if tokens.shape[1] == self.sample_begin:
            logits[:, self.ids] = -math.inf


class SuppressTokens:
    """Forbid non-speech symbols (openai-whisper's list: brackets, music notes, ...) and the special tokens
    that never belong inside a transcript."""

    def __init__(self, tokenizer):
        special = [tokenizer.transcribe, tokenizer.translate, tokenizer.sot]
        for name in ("sot_prev", "sot_lm", "no_speech"):
            if getattr(tokenizer, name, None) is not None:
                special.append(getattr(tokenizer, name))
        self.ids = sorted(set(tokenizer.non_speech_tokens) | set(special))

    def apply(self, logits, tokens):
        logits[:, self.ids] = -math.inf


def logit_filters(tokenizer, sample_begin: int):
    return [SuppressBlank(tokenizer, sample_begin), SuppressTokens(tokenizer)]


def text_of(tokenizer, tokens) -> str:
    """Transcript of sampled tokens: special tokens (ids >= eot: timestamps, notimestamps) carry no text."""
    return tokenizer.decode([t for t in tokens if t < tokenizer.eot]).strip()


def draw(weights, n: int, generator=None):
    """n independent draws from one row of (not necessarily normalised) weights (V,), by inverting the
    cumulative distribution with uniform numbers (one cumsum; torch.multinomial would draw an exponential
    variate for every vocabulary entry). Returns (distinct tokens, how many draws gave each)."""
    cdf = weights.cumsum(dim=-1)
    u = torch.rand(n, generator=generator).to(weights.device) * cdf[-1]
    # right side: the first entry whose cdf exceeds u, so zero-weight (suppressed) tokens are never drawn
    drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[-1] - 1)
    return torch.unique(drawn, return_counts=True)


def _sample_len(model) -> int:
    return model.dims.n_text_ctx // 2  # 224 for every released model, as openai-whisper


@torch.no_grad()
def sample_tokens(model: Whisper, tokenizer, audio_features, rows_per_clip: int = 1, temperature: float = 0.0,
                  top_k: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """Greedy (temperature 0) or sampled decoding of `rows_per_clip` samples per clip, all clips as one batch.

    Returns a list (clip-major, A·rows_per_clip entries) of (tokens: list[int] without eot, sum_logprob).
    sum_logprob is the total log-probability of the chosen tokens under the *untempered* model (after the
    logit filters): temperature only widens the search; the ranking should reflect what the model believes.

    Samples that share a prefix share its computation: the batch holds each distinct prefix once, with the
    number of samples that spell it. At each step those samples draw their next tokens independently from the
    prefix's distribution and split into the distinct continuations. That is the distribution of decoding every
    sample on its own row, at the cost of the distinct prefixes only: at temperature 0.7 most of 200 samples
    agree on most tokens. Finished prefixes leave the batch."""
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    sample_begin = len(prompt)
    A = audio_features.shape[0]
    device = audio_features.device
    inference = Inference(model, audio_features)  # one row per clip to start with
    filters = logit_filters(tokenizer, sample_begin)
    tokens = torch.tensor([prompt], device=device).repeat(A, 1)  # (rows, T): one distinct prefix per row
    counts = [rows_per_clip] * A  # samples spelling each row's prefix
    clip = list(range(A))  # the clip each row reads
    sum_logprobs = torch.zeros(A, device=device)
    results = [[] for _ in range(A)]
    max_steps = min(_sample_len(model), model.dims.n_text_ctx - sample_begin)
    for step in range(max_steps):
        logits = inference.logits(tokens)  # (rows, V)
        for f in filters:
            f.apply(logits, tokens)
        logprobs = F.log_softmax(logits, dim=-1)
        parents, next_tokens, counts = draw_next(logits, logprobs, counts, temperature, top_k, generator)
        rows = torch.tensor(parents, device=device)
        nxt = torch.tensor(next_tokens, device=device)
        sum_logprobs = sum_logprobs[rows] + logprobs[rows, nxt]
        tokens = torch.cat([tokens[rows], nxt[:, None]], dim=1)
        clip = [clip[r] for r in parents]
        done = [t == tokenizer.eot or step == max_steps - 1 for t in next_tokens]  # out of room: keep it
        for i in (i for i, d in enumerate(done) if d):
            seq = tokens[i, sample_begin:].tolist()
            seq = seq[:-1] if seq[-1] == tokenizer.eot else seq
            results[clip[i]] += [(seq, float(sum_logprobs[i]))] * counts[i]
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            break
        inference.select(rows[keep])  # the cache follows: parents duplicated, finished rows dropped
        idx = torch.tensor(keep, device=device)
        tokens, sum_logprobs = tokens[idx], sum_logprobs[idx]
        clip, counts = [clip[i] for i in keep], [counts[i] for i in keep]
    return [r for per_clip in results for r in per_clip]


def draw_next(logits, logprobs, counts, temperature: float, top_k=None, generator=None):
    """The next token of every sample, grouped by prefix row: (parents, next_tokens, counts), one entry per
    distinct continuation (the row it extends, its token, the samples that chose it). Greedy: one per row.
    Sampled: each row's samples draw from p^(1/T) (top-k filtered) and split into the tokens they drew."""
    if temperature == 0:
        return list(range(len(counts))), logits.argmax(dim=-1).tolist(), counts
    # p^(1/T) ∝ softmax(logits / T); logprobs <= 0, so the power cannot overflow
    weights = torch.exp(logprobs * (1.0 / temperature))
    if top_k is not None:
        kth = torch.topk(logprobs, top_k, dim=-1).values[:, -1:]
        weights.masked_fill_(logprobs < kth, 0.0)
    parents, next_tokens, new_counts = [], [], []
    for r, n in enumerate(counts):
        toks, ns = draw(weights[r], n, generator)
        parents += [r] * len(toks)
        next_tokens += toks.tolist()
        new_counts += ns.tolist()
    return parents, next_tokens, new_counts


def decode_greedy(model: Whisper, tokenizer, audio_features) -> list:
    """Greedy transcripts of a batch of clips: audio_features (B, F, W) → B strings."""
    return [text_of(tokenizer, t) for t, _ in sample_tokens(model, tokenizer, audio_features)]


def sample_candidates(model: Whisper, tokenizer, audio_features, n_samples: int = 200, temperature=(0.7, 0.8),
                      min_unique: int = 10, seed: int = 0, top_k: Optional[int] = None,
                      retry_increments=(0.1, 0.2)) -> dict:
    """Every distinct transcript that Whispering-LLaMA's sampling recipe draws for one clip (audio_features
    (1, F, W)): the raw material of the n-best list, kept whole so that the list's form (ranking, text
    normalisation, ground-truth removal) can change without sampling again.

    Draw `n_samples` transcripts as one batch at a temperature drawn uniformly from `temperature`. When fewer
    than `min_unique` distinct texts come out, sample again hotter (range + 0.1, then + 0.2) and pool the
    results. Seeded: the same inputs and seed give the same result.
    Returns {"temperatures": [T of each round], "samples": [(text, total_logprob, count)]}, best log-prob
    first: total_logprob is the highest among the samples that spell the text (under the untempered model),
    count how many of all samples did."""
    if audio_features.dim() != 3 or audio_features.shape[0] != 1:
        raise ValueError(f"sampling takes the features of one clip (1, F, W), got {tuple(audio_features.shape)}")
    lo, hi = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    generator = torch.Generator().manual_seed(seed)
    best, counts, temperatures = {}, {}, []  # text -> highest total log-prob; text -> samples
    for extra in (0.0,) + tuple(retry_increments):
        t = lo + extra + (hi - lo) * torch.rand((), generator=generator).item()
        temperatures.append(t)
        for seq, lp in sample_tokens(model, tokenizer, audio_features, n_samples, t, top_k, generator):
            text = text_of(tokenizer, seq)
            if not text:
                continue
            counts[text] = counts.get(text, 0) + 1
            best[text] = max(lp, best.get(text, -math.inf))
        if len(best) >= min_unique:
            break
    ranked = sorted(best, key=best.get, reverse=True)
    return {"temperatures": temperatures, "samples": [(text, best[text], counts[text]) for text in ranked]}


def sample_nbest(model: Whisper, tokenizer, audio_features, n_samples: int = 200, keep: int = 15,
                 temperature=(0.7, 0.8), min_unique: int = 10, seed: int = 0, top_k: Optional[int] = None,
                 retry_increments=(0.1, 0.2)) -> list:
    """The paper's n-best list for one clip (audio_features (1, F, W)): the distinct sampled transcripts of
    `sample_candidates`, ranked by total log-probability (under the untempered model), the best `keep`.
    Returns [(text, total_logprob)], best first."""
    drawn = sample_candidates(model, tokenizer, audio_features, n_samples, temperature, min_unique, seed, top_k,
                              retry_increments)
    return [(text, lp) for text, lp, _ in drawn["samples"][:keep]]

