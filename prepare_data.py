"""Speech + transcripts -> what train.py and evaluate.py read, and the reader of that format.

For every utterance (Whispering-LLaMA, Radhakrishnan et al., EMNLP 2023, §3 and DESIGN.md §1):

    audio ──► Whisper (--nbest-model) ──► 200 samples, T ~ U[0.7, 0.8] ──► distinct samples, kept whole
      │                              └─► greedy 1-best                    with log-probs and counts
      └────► Whisper encoder (--feature-model) ──► (1500, W) float16 features
    samples ──► n-best list in a form (HYPOTHESIS_FORMS: top 15 by log-prob, or the reference code's
                normalised alphabetical list), ground truth removed before the cut, never empty
    n-best ──► Alpaca prompt ──► LLM token ids (prompt, then the response encoded on its own);
                                 labels = ids with the prompt masked (-100)

The n-best list and the tokens are derived from the stored samples, so a change of form, of --keep or of
the LLM re-derives them in place (rederive) without sampling again.

Sections, in reading order:
  synthesis     eSpeak NG through ctypes (the embedded demo corpus is spoken by it)
  prompt        the Alpaca template, build_prompt, tokenize_example (train.py / generate.py import them)
  demo corpus   an ATIS-like grammar of flight requests, splits, voices, noise
  inputs        manifests (JSONL/JSON/CSV/TSV), folders (.txt, LibriSpeech), HyPoradise n-best JSON
  storage       memory-mapped feature shards + a JSONL index, committed a chunk at a time;
                PreparedDataset and collate (train.py / evaluate.py import them)
  preparing     the per-utterance pipeline, resumable; the command line

    python prepare_data.py                       # the demo corpus -> data/demo
    python prepare_data.py --manifest m.jsonl --out data/mine --limit 50
"""
import _ctypes
import argparse
import atexit
import csv
import ctypes
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from convert_checkpoint import ensure_llm, load_whisper
from storage import ProjectError, first_line, write_atomic
from tokenizer import Tokenizer
from whisper_model import FRAMES_PER_SECOND, N_AUDIO_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, decode_greedy, \
    load_audio, log_mel_spectrogram, pad_or_trim, sample_candidates


class SynthesisError(ProjectError):
    """eSpeak NG could not be loaded, or was given a voice or text it cannot speak."""


# ----------------------------------------------------------------------------------------------------
# Speech synthesis: eSpeak NG through ctypes over the library shipped by PyPI `espeakng-loader`
# ----------------------------------------------------------------------------------------------------

# Constants from espeak-ng's speak_lib.h (the C API is stable since eSpeak 1.x).
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # the synth callback is called from inside espeak_Synth; no audio device
_POS_CHARACTER = 1
_espeakCHARS_UTF8 = 1
_espeakRATE, _espeakPITCH = 1, 3
_EE_OK = 0

# typedef int (t_espeak_callback)(short* wav, int numsamples, espeak_EVENT* events); we never read the events.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

_espeak_lock = threading.Lock()  # eSpeak is a process-wide singleton: one synthesis at a time
_espeak_paths = None  # (private copy of libespeak-ng.so, data path), set up once per process
_chunks = []  # int16 chunks written by the callback during one espeak_Synth call


def _on_audio(wav, numsamples, events):
    if wav and numsamples > 0:
        # copy now: the buffer belongs to eSpeak and is reused for the next chunk
        _chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).astype(np.int16, copy=True))
    return 0  # 0 = keep synthesising


_on_audio_c = _SYNTH_CALLBACK(_on_audio)  # module-level: eSpeak keeps only the raw function pointer


def _espeak_setup():
    """Once per process: find the library and data of `espeakng-loader` and copy the library to a private
    temporary file, so that no one else in this process holds a handle on the copy we load and unload."""
    global _espeak_paths
    if _espeak_paths is None:
        try:
            import espeakng_loader
            src, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
            fd, lib_path = tempfile.mkstemp(prefix="whispering-llama-espeak-", suffix=".so")
            with os.fdopen(fd, "wb") as f, open(src, "rb") as g:
                shutil.copyfileobj(g, f)
        except (ImportError, OSError, RuntimeError) as e:
            raise SynthesisError(f"cannot find eSpeak NG (pip install espeakng-loader): {e}") from None
        atexit.register(os.remove, lib_path)
        _espeak_paths = (lib_path, data_path)
    return _espeak_paths


def _espeak_load():
    """Load and initialise a fresh eSpeak NG. Returns (lib, sample_rate).

    Why fresh for every utterance: eSpeak's wave generator keeps state in C statics (the pitch-flutter
    index, the AGC level, the wave phase) that espeak_Terminate does not reset, so the same text would
    sound slightly different depending on what was spoken before it (measured: 64973, 64990, 65207
    samples for three identical calls). Unloading the library (dlclose) and loading it again restores
    every static; it costs a few milliseconds, far less than the speech recognition that follows."""
    lib_path, data_path = _espeak_setup()
    try:
        lib = ctypes.CDLL(lib_path)
    except OSError as e:
        raise SynthesisError(f"cannot load eSpeak NG: {e}") from None
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    if sample_rate <= 0:
        _espeak_unload(lib)
        raise SynthesisError(f"espeak_Initialize failed with data path {data_path}")
    lib.espeak_SetSynthCallback(_on_audio_c)
    lib.espeak_ng_SetRandSeed(1)  # breath/noise sources of some variants draw from eSpeak's own generator
    return lib, sample_rate


def _espeak_unload(lib):
    lib.espeak_Terminate()
    _ctypes.dlclose(lib._handle)


def synthesize(text, voice="en-us", rate=175, pitch=50):
    """Speak `text` with eSpeak NG. Returns (int16 samples (N,), sample_rate) — 22050 Hz for eSpeak NG.

    voice: an eSpeak voice name, optionally with a variant ("en-us", "en-us+m3", "en+f2");
    rate: words per minute (80..450); pitch: base pitch 0..100 (50 = the voice's default).
    The same arguments give the same samples, whatever was synthesised before."""
    if not isinstance(text, str) or not text.strip():
        raise SynthesisError("cannot synthesise empty text")
    with _espeak_lock:
        lib, sample_rate = _espeak_load()
        try:
            # the voice first: selecting a voice resets rate and pitch to its defaults
            if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise SynthesisError(f"unknown eSpeak voice {voice!r} (try 'en-us' or 'en-us+m3')")
            lib.espeak_SetParameter(_espeakRATE, int(rate), 0)
            lib.espeak_SetParameter(_espeakPITCH, int(pitch), 0)
            data = text.encode("utf-8") + b"\0"
            _chunks.clear()
            err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _espeakCHARS_UTF8, None, None)
            lib.espeak_Synchronize()
            audio = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
            _chunks.clear()
        finally:
            _espeak_unload(lib)
    if err != _EE_OK:
        raise SynthesisError(f"espeak_Synth failed (error {err}) for text {text[:40]!r}")
    return audio, sample_rate


# ----------------------------------------------------------------------------------------------------
# The prompt (DESIGN.md §1): the Alpaca template with the n-best list as its input
# ----------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
    "You are an ASR transcript selector. You have a few transcripts generated by an automatic speech recognition "
    "model. Your task is to generate the most likely transcript from them. If the generated transcripts have "
    "grammatical or logical errors, you will modify them accordingly to produce the most accurate and coherent "
    "transcript.\n\n"
    "### Input:\n"
    "{input}\n\n"
    "### Response:"
)


def build_prompt(hypotheses) -> str:
    """The prompt for one utterance: its n-best hypotheses, one per line, as the Alpaca input.
    The response (the transcript) follows "### Response:" directly, with no space."""
    return PROMPT_TEMPLATE.format(input="\n".join(h.strip() for h in hypotheses))


def tokenize_example(tokenizer, hypotheses, response):
    """Token ids and labels for one training example. Returns (ids (T,), labels (T,)) LongTensors.

    The prompt is encoded with BOS and no EOS, the response on its own with EOS and no BOS, and the two id
    lists are concatenated: never prompt + response as one string, because a byte-level BPE merges the
    prompt's final ":" with a response that starts with a quote or a dash (or, with LLaMA-3's pre-tokeniser, a
    letter), and the prompt would no longer be a prefix of what the model trains on; at inference the model
    reads exactly these prompt ids. Data text is ordinary text (special=False): a literal "<|im_end|>" in a
    transcript stays characters. The labels are the ids with every prompt position set to IGNORE_INDEX, so the
    loss covers the response and its EOS only (without this masking WER gets much worse: the paper's Table 2)."""
    prompt_ids = tokenizer.encode(build_prompt(hypotheses), bos=True, eos=False, special=False)
    response_ids = tokenizer.encode(response.strip(), bos=False, eos=True, special=False)
    ids = torch.cat([prompt_ids, response_ids])
    labels = ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return ids, labels


# The n-best list's text form. Both are legitimate readings of the paper; an adapter must be used with the
# form it was trained on, so the form is recorded in the prepared data's meta.json and in every adapter file.
HYPOTHESIS_FORMS = {
    "logprob": "the paper's text (§4.2): the distinct samples as Whisper wrote them (case, punctuation), "
               "highest total log-probability first",
    "reference": "the reference code (and the paper's Fig. 5): every sample lowercased with . , ? - : \" ' "
                 "removed, the distinct results in alphabetical order",
}
_REFERENCE_STRIP = str.maketrans("", "", ".,?-:\"'")


def reference_form(text: str) -> str:
    """One sample as the reference code wrote it into the prompt: lowercased, stripped, . , ? - : " ' removed."""
    return text.lower().strip().translate(_REFERENCE_STRIP)


def select_hypotheses(samples, ground_truth=None, form="logprob", keep=15, keep_ground_truth=False):
    """The n-best list of one utterance from its distinct samples [(text, total_logprob or None, count)],
    best log-prob first (as whisper_model.sample_candidates returns them, or a given list in its order).

    form: a key of HYPOTHESIS_FORMS. The ground truth (in the same form) is removed *before* the cut to `keep`,
    as the reference code does (the paper: the model must correct, not copy), unless keep_ground_truth.
    Policy for a list that removal would leave empty (the only distinct sample is the ground truth): the ground
    truth stays, so prepare, train, evaluate and generate all see the same non-empty prompt; the utterance is
    flagged (ground_truth_kept) and counted in the summary.
    Returns (hypotheses, logprobs, {"ground_truth_in_nbest": bool, "ground_truth_kept": bool})."""
    if form not in HYPOTHESIS_FORMS:
        raise ValueError(f"unknown hypothesis form {form!r}; choose from {', '.join(HYPOTHESIS_FORMS)}")
    if form == "logprob":
        candidates, seen = [], set()
        for t, lp, _ in samples:
            if t.strip() and t.strip() not in seen:
                seen.add(t.strip())
                candidates.append((t.strip(), lp))
    else:
        best = {}
        for t, lp, _ in samples:
            t = reference_form(t)
            if t and (t not in best or (lp is not None and (best[t] is None or lp > best[t]))):
                best[t] = lp
        candidates = sorted(best.items())
    flags = {"ground_truth_in_nbest": False, "ground_truth_kept": False}
    if ground_truth is not None:
        gt = ground_truth.strip() if form == "logprob" else reference_form(ground_truth)
        flags["ground_truth_in_nbest"] = any(t == gt for t, _ in candidates)
        if flags["ground_truth_in_nbest"] and not keep_ground_truth:
            rest = [(t, lp) for t, lp in candidates if t != gt]
            flags["ground_truth_kept"] = not rest
            candidates = rest or candidates
    candidates = candidates[:keep]
    return [t for t, _ in candidates], [lp for _, lp in candidates], flags


# ----------------------------------------------------------------------------------------------------
# The embedded demo corpus: ATIS-like flight-information requests from a grammar
# ----------------------------------------------------------------------------------------------------

# city -> its airports, as people name them. Cities and airports of the original ATIS domain, plus a few.
AIRPORTS = {
    "Atlanta": ["Hartsfield-Jackson Atlanta International"],
    "Baltimore": ["Baltimore-Washington International"],
    "Boston": ["Logan International", "Boston Logan"],
    "Charlotte": ["Charlotte Douglas International"],
    "Chicago": ["O'Hare", "Midway"],
    "Cincinnati": ["Cincinnati Northern Kentucky International"],
    "Cleveland": ["Cleveland Hopkins International"],
    "Columbus": ["John Glenn Columbus International"],
    "Dallas": ["Dallas-Fort Worth International", "Love Field"],
    "Denver": ["Denver International"],
    "Detroit": ["Detroit Metropolitan"],
    "Houston": ["Bush Intercontinental", "Hobby Airport"],
    "Indianapolis": ["Indianapolis International"],
    "Kansas City": ["Kansas City International"],
    "Las Vegas": ["Harry Reid International", "McCarran"],
    "Los Angeles": ["LAX", "Los Angeles International"],
    "Memphis": ["Memphis International"],
    "Miami": ["Miami International"],
    "Milwaukee": ["Mitchell International"],
    "Minneapolis": ["Minneapolis-Saint Paul International"],
    "Nashville": ["Nashville International"],
    "New York": ["JFK", "LaGuardia", "Newark"],
    "Oakland": ["Oakland International"],
    "Orlando": ["Orlando International"],
    "Philadelphia": ["Philadelphia International"],
    "Phoenix": ["Sky Harbor"],
    "Pittsburgh": ["Pittsburgh International"],
    "Saint Louis": ["Lambert International"],
    "Salt Lake City": ["Salt Lake City International"],
    "San Diego": ["San Diego International", "Lindbergh Field"],
    "San Francisco": ["San Francisco International", "SFO"],
    "San Jose": ["San Jose International"],
    "Seattle": ["Seattle-Tacoma International", "Sea-Tac"],
    "Tampa": ["Tampa International"],
    "Washington": ["Dulles", "Reagan National"],
}
CITIES = list(AIRPORTS)
AIRLINES = ["American Airlines", "Delta", "United", "Continental", "Northwest", "US Air", "Southwest",
            "Alaska Airlines", "JetBlue", "America West", "Frontier", "Midwest Express"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PARTS_OF_DAY = ["morning", "afternoon", "evening", "night"]
FARE_CLASSES = ["first class", "business class", "coach", "economy", "discount coach", "premium economy"]
FARE_CODES = ["Y", "F", "H", "B", "M", "Q", "QX", "QW", "FN", "YN", "BH", "KN"]
MEALS = ["breakfast", "lunch", "dinner", "a snack", "a vegetarian meal", "a hot meal"]
GROUND = ["taxi", "limousine", "rental car", "airport shuttle", "city bus", "train"]
AIRCRAFT = ["Boeing 737", "Boeing 757", "Boeing 767", "Airbus A320", "DC-10", "MD-80", "Boeing 747"]
PASSENGERS = ["one adult", "two adults", "three adults", "two adults and a child", "a family of four",
              "two passengers", "four passengers", "one adult and two children"]

# Each template is a sentence in natural written form; {slots} are filled by _fill_slot.
TEMPLATES = [
    "Show me flights from {from} to {to}.",
    "Show me the flights from {from} to {to} {when}.",
    "Show me all {airline} flights from {from} to {to} {when}.",
    "I need a flight from {from} to {to} {when}.",
    "I would like to fly from {from} to {to} {when}.",
    "I'd like a nonstop flight from {from} to {to} {when}.",
    "What flights go from {from} to {to} {when}?",
    "What flights are there from {from} to {to} that arrive before {clock}?",
    "Are there any nonstop flights from {from} to {to} {when}?",
    "Please list the flights from {from} to {to} leaving after {clock} on {weekday}.",
    "List all {airline} flights from {from} to {to}.",
    "Find me a flight from {from} to {to} with a stop in {via}.",
    "Give me the flights leaving {airport} for {to} {when}.",
    "What is the cheapest fare from {from} to {to}?",
    "What is the cheapest one-way fare from {from} to {to} {day}?",
    "How much is a {fare} ticket from {from} to {to}?",
    "What are the {fare} fares on {airline} from {from} to {to}?",
    "Show me round trip fares from {from} to {to} under {price}.",
    "Is there a one-way fare from {from} to {to} for less than {price}?",
    "Which airlines fly from {from} to {to}?",
    "Which airlines have nonstop service between {from} and {to}?",
    "Does {airline} have a flight from {from} to {to} {when}?",
    "What time does the last flight from {from} to {to} leave {day}?",
    "What time does the first {airline} flight from {from} arrive in {to}?",
    "When does {airline} flight {flight} arrive in {to}?",
    "Which flights from {from} to {to} serve {meal}?",
    "Is {meal} served on {airline} flight {flight}?",
    "What type of aircraft is used on {airline} flight {flight}?",
    "Does {airline} fly a {aircraft} from {from} to {to}?",
    "Does {airline} flight {flight} stop in {via}?",
    "I want to go from {from} to {to} on {date} and come back on {date2}.",
    "Book a one-way ticket from {from} to {to} for {passengers} on {date}.",
    "I need {fare} seats for {passengers} from {from} to {to} {when}.",
    "How many flights does {airline} have from {from} to {to} {day}?",
    "What ground transportation is available in {city}?",
    "Is there a {ground} from {airport} to downtown {city}?",
    "How much does a {ground} cost from {airport} to downtown {city}?",
    "How far is {airport} from downtown {city}?",
    "What airports are there in {city}?",
    "What does fare code {code} mean?",
    "What is the arrival time in {to} for {airline} flight {flight}?",
    "Show me the earliest flight from {from} to {to} {day}.",
    "What is the latest {airline} flight from {from} to {to} {day}?",
    "Can I get a {fare} seat from {from} to {to} on {date}?",
]


def _clock(rng, hour=None) -> str:
    """A clock time as written in US English, between 5 a.m. and 11:45 p.m.: "8 a.m.", "10:30 p.m.", "noon"."""
    hour = rng.randint(5, 23) if hour is None else hour
    minute = rng.choice([0, 0, 0, 15, 30, 30, 45])
    if hour == 12 and minute == 0:
        return "noon"
    half = "a.m." if hour < 12 else "p.m."
    hour12 = (hour - 1) % 12 + 1
    return f"{hour12} {half}" if minute == 0 else f"{hour12}:{minute:02d} {half}"


def _clock_range(rng) -> str:
    start = rng.randint(5, 19)
    return f"between {_clock(rng, start)} and {_clock(rng, start + rng.randint(1, 4))}"


def _date(rng) -> str:
    day = rng.randint(1, 28)
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{rng.choice(MONTHS)} {day}{suffix}"


def _day(rng) -> str:
    """When, at the granularity of a day: "on Monday", "on June 5th", "tomorrow"."""
    r = rng.random()
    if r < 0.45:
        return f"on {rng.choice(WEEKDAYS)}"
    if r < 0.8:
        return f"on {_date(rng)}"
    return rng.choice(["today", "tomorrow", f"next {rng.choice(WEEKDAYS)}", f"this {rng.choice(WEEKDAYS)}"])


def _when(rng) -> str:
    """When, with an optional time of day: "on Monday morning", "on June 5th after 3 p.m."."""
    r = rng.random()
    if r < 0.25:
        return _day(rng)
    if r < 0.45:
        return f"on {rng.choice(WEEKDAYS)} {rng.choice(PARTS_OF_DAY)}"
    if r < 0.6:
        return f"{_day(rng)} in the {rng.choice(PARTS_OF_DAY[:3])}"
    if r < 0.8:
        return f"{_day(rng)} {rng.choice(['before', 'after', 'around'])} {_clock(rng)}"
    if r < 0.9:
        return f"{_day(rng)} {_clock_range(rng)}"
    return f"tomorrow {rng.choice(PARTS_OF_DAY[:3])}"


def _fill_slot(name, rng, chosen):
    """The text for one slot. `chosen` carries the cities already picked, so that "from" != "to" != "via"
    and an {airport} belongs to its {city}."""
    if name in ("from", "to", "via", "city"):
        if name == "city" and "airport" in chosen:  # {airport} came first in the template
            return chosen["airport_city"]
        city = rng.choice([c for c in CITIES if c not in chosen.values()])
        if name == "city":
            chosen["airport_city"] = city
        return city
    if name == "airport":
        city = chosen.get("airport_city") or rng.choice([c for c in CITIES if c not in chosen.values()])
        chosen["airport_city"] = city
        return rng.choice(AIRPORTS[city])
    if name in ("when", "day", "clock", "date", "date2"):
        return {"when": _when, "day": _day, "clock": _clock, "date": _date, "date2": _date}[name](rng)
    if name == "flight":
        return str(rng.choice([rng.randint(10, 99), rng.randint(100, 999), rng.randint(1000, 2999)]))
    if name == "price":
        return f"${rng.randrange(150, 1000, 50)}"
    table = {"airline": AIRLINES, "weekday": WEEKDAYS, "fare": FARE_CLASSES, "code": FARE_CODES, "meal": MEALS,
             "ground": GROUND, "aircraft": AIRCRAFT, "passengers": PASSENGERS}
    return rng.choice(table[name])


_SLOT = re.compile(r"\{(\w+)\}")


def demo_sentence(rng) -> str:
    """One random sentence of the grammar."""
    template = rng.choice(TEMPLATES)
    chosen = {}

    def fill(m):
        value = _fill_slot(m.group(1), rng, chosen)
        chosen.setdefault(m.group(1), value)
        return value

    # a sentence that ends on "a.m." keeps a single full stop
    return _SLOT.sub(fill, template).replace("..", ".")


def demo_sentences(n=3000, seed=0) -> list:
    """n distinct sentences of the grammar, in a fixed order for a given seed."""
    rng = random.Random(seed)  # Python's Mersenne Twister: same sequence on every platform and version
    seen, out = set(), []
    for _ in range(100 * n):
        s = demo_sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"the grammar produced only {len(out)} distinct sentences, fewer than {n}")


def split_sentences(sentences, seed=0, fractions=(0.8, 0.1, 0.1)) -> dict:
    """Split distinct sentences into {"train", "dev", "test"} by sentence: a sentence is in exactly one split."""
    if len(set(sentences)) != len(sentences):
        raise ValueError("sentences must be distinct to split them without leakage")
    order = sorted(sentences)  # independent of the order they came in
    random.Random(seed + 1).shuffle(order)
    n_dev, n_test = round(fractions[1] * len(order)), round(fractions[2] * len(order))
    n_train = len(order) - n_dev - n_test
    return {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}


def speakable(text: str) -> str:
    """The text handed to eSpeak for a written sentence: eSpeak reads "$450" as "dollar four hundred
    fifty", so prices are rewritten as "450 dollars". The written form stays the ground truth."""
    return re.sub(r"\$(\d+)", r"\1 dollars", text)


# eSpeak voices for the demo corpus: American and British English, male and female variants, chosen by
# tiny.en's WER on them (the Caribbean voice, the klatt variants and m7 came out above 50% on clean speech,
# en-gb-x-rp well above the others with noise) so that the corpus lands at 10-30% 1-best WER.
DEMO_VOICES = ["en-us", "en-us+m1", "en-us+m3", "en-us+f2", "en-us+f3", "en+m3"]
DEMO_SNR_DB = (25.0, 40.0)  # mild: white noise at 10 dB already pushes tiny.en past 60% WER
DEMO_RATE = (150, 186)  # words per minute; eSpeak's default is 175
DEMO_PITCH = (35, 66)  # eSpeak's 0-100 scale; 50 is the voice's own
DEMO_SAMPLE_RATE = 16000  # written at Whisper's rate so that loading needs no resampling
NOISE_KINDS = ("white", "pink", "brown")


def _noise(kind, n, rng):
    """Unit-variance noise of a colour: white (flat), pink (power ~ 1/f) or brown (power ~ 1/f^2)."""
    white = rng.standard_normal(n)
    if kind != "white":
        spectrum = np.fft.rfft(white)
        f = np.arange(len(spectrum), dtype=np.float64)
        f[0] = 1.0
        spectrum /= np.sqrt(f) if kind == "pink" else f
        white = np.fft.irfft(spectrum, n)
    return white / (white.std() + 1e-12)


def demo_utterance_settings(utt_id, seed=0) -> dict:
    """How one demo utterance is spoken: voice, rate, pitch, noise colour and SNR, silence around it.
    Drawn from a generator seeded by (seed, id), so each utterance is reproducible on its own."""
    rng = np.random.default_rng([seed, zlib.crc32(utt_id.encode())])
    return {
        "voice": DEMO_VOICES[rng.integers(len(DEMO_VOICES))],
        "rate": int(rng.integers(*DEMO_RATE)),
        "pitch": int(rng.integers(*DEMO_PITCH)),
        "noise": NOISE_KINDS[rng.integers(len(NOISE_KINDS))],
        "snr_db": round(float(rng.uniform(DEMO_SNR_DB[0], DEMO_SNR_DB[1])), 1),
        "lead_s": round(float(rng.uniform(0.3, 0.8)), 2),  # Whisper garbles speech that starts at 0 s
        "tail_s": round(float(rng.uniform(0.1, 0.5)), 2),
        "noise_seed": int(rng.integers(2**31)),
    }


def render_demo_utterance(text, settings) -> np.ndarray:
    """Speak `text` as `settings` say, at 16 kHz, with silence around it and noise at the SNR.
    Returns float32 samples in [-1, 1]."""
    import soxr

    speech, sr = synthesize(speakable(text), settings["voice"], settings["rate"], settings["pitch"])
    speech = soxr.resample(speech.astype(np.float32) / 32768.0, sr, DEMO_SAMPLE_RATE)
    speech_power = np.mean(speech.astype(np.float64) ** 2)  # of the speech alone, before the silences
    lead, tail = (np.zeros(int(settings[k] * DEMO_SAMPLE_RATE), np.float32) for k in ("lead_s", "tail_s"))
    audio = np.concatenate([lead, speech, tail]).astype(np.float64)
    rng = np.random.default_rng(settings["noise_seed"])
    noise = _noise(settings["noise"], len(audio), rng) * np.sqrt(speech_power / 10 ** (settings["snr_db"] / 10))
    audio = audio + noise
    peak = np.abs(audio).max()
    if peak > 0.99:  # scale down rather than clip
        audio *= 0.99 / peak
    return audio.astype(np.float32)


def _write_audio_atomic(path, audio, sample_rate):
    import soundfile as sf

    path = Path(path)  # soundfile takes the format from the name, which the temporary file does not keep
    write_atomic(path, lambda f: sf.write(f, audio, sample_rate, subtype="PCM_16", format=path.suffix[1:].upper()))


def build_demo_corpus(out_dir, n=3000, seed=0, limit=None, progress=True) -> Path:
    """Synthesise the demo corpus under out_dir: audio/<split>/<id>.flac (16 kHz) and manifest.jsonl.
    Files already there are kept (a rerun only fills in what is missing). Returns the manifest path.
    limit: at most this many utterances of each split."""
    out_dir = Path(out_dir)
    # the ids name sentences through (n, seed): a folder built with others must not be mixed into
    params, params_path = {"demo_size": n, "seed": seed}, out_dir / "demo.json"
    if params_path.exists() and json.loads(params_path.read_text()) != params:
        raise InputError(f"{out_dir} holds a demo corpus built with {params_path.read_text().strip()}; "
                         "use another --out for other --demo-size / --seed values")
    write_atomic(params_path, json.dumps(params) + "\n")
    splits = split_sentences(demo_sentences(n, seed), seed)
    rows = []
    for split, sentences in splits.items():
        for i, text in enumerate(sentences[:limit]):
            utt_id = f"{split}-{i:05d}"
            rows.append({"id": utt_id, "audio": f"audio/{split}/{utt_id}.flac", "text": text, "split": split,
                         **demo_utterance_settings(utt_id, seed)})
    return _synthesise(out_dir, rows, "synthesising demo corpus", progress)


def _synthesise(out_dir: Path, rows, desc, progress) -> Path:
    """Speak every row (its text and settings) into out_dir/<row audio> unless that file exists, then write
    the manifest. Returns its path."""
    for row in tqdm(rows, desc=desc, unit="utt", disable=not progress):
        path = out_dir / row["audio"]
        if not path.exists():
            _write_audio_atomic(path, render_demo_utterance(row["text"], row), DEMO_SAMPLE_RATE)
    manifest = out_dir / "manifest.jsonl"
    write_atomic(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# Held-out demo utterances: the demo's domain, but sentences written by hand that its grammar never produces
# (tests/test_prepare_data.py checks) and a voice that it never uses. They measure whether an adapter trained
# on the demo corpus generalises beyond the grammar's sentences and voices (python prepare_data.py --heldout).
HELDOUT_SENTENCES = [
    "Could you tell me which flights leave Boston for Denver tomorrow morning?",
    "I have to be in Chicago by 9 a.m. on Friday.",
    "Are there any seats left on the evening flight to Seattle?",
    "My sister wants to fly from Atlanta to Miami next Sunday.",
    "Please find a cheap flight from Dallas to Phoenix for two people.",
    "Which airline has the most flights between New York and Washington?",
    "I'd rather take a morning flight from Houston to San Francisco.",
    "How long is the flight from Philadelphia to Los Angeles?",
    "Do any flights from Pittsburgh to Baltimore leave after 8 p.m.?",
    "We need a rental car at Denver airport on Monday.",
    "Is lunch included on the flight from Detroit to Orlando?",
    "Can you book me on the first flight out of Boston on Thursday?",
    "What is the total price of a round trip from Oakland to Las Vegas?",
    "I am looking for a direct flight from Minneapolis to Salt Lake City.",
    "Tell me the departure times of United flights from Chicago to Newark.",
    "Which flights to Memphis stop in Nashville?",
    "Does the airport shuttle run from Dulles to downtown Washington at night?",
    "Do children flying with two adults to Tampa get a discount?",
    "What gate does the Delta flight to Atlanta leave from?",
    "Are there cheaper fares if I fly on Wednesday instead of Friday?",
    "I want to change my flight from Cleveland to Indianapolis to the afternoon.",
    "How many stops does the cheapest flight from Seattle to Boston make?",
    "Could I get a window seat on the 7 a.m. flight to Denver?",
    "Show me evening flights from San Diego to Portland on American Airlines.",
]
HELDOUT_VOICE = "en-us+f4"  # not in DEMO_VOICES


def build_heldout_corpus(out_dir, seed=0, progress=True) -> Path:
    """Synthesise the held-out demo utterances (split "test") under out_dir, as build_demo_corpus does, in the
    unseen voice. Returns the manifest path."""
    out_dir = Path(out_dir)
    rows = []
    for i, text in enumerate(HELDOUT_SENTENCES):
        utt_id = f"heldout-{i:03d}"
        settings = {**demo_utterance_settings(utt_id, seed), "voice": HELDOUT_VOICE}
        rows.append({"id": utt_id, "audio": f"audio/{utt_id}.flac", "text": text, "split": "test", **settings})
    return _synthesise(out_dir, rows, "synthesising held-out utterances", progress)


# ----------------------------------------------------------------------------------------------------
# Inputs: manifests (JSONL / CSV / TSV), folders of audio + transcripts, HyPoradise-style n-best JSON
# ----------------------------------------------------------------------------------------------------


class InputError(ProjectError):
    """An input (manifest, folder, n-best file) that cannot be read."""


@dataclass
class Utterance:
    id: str
    audio: str  # path of the audio file
    text: Optional[str]  # the ground truth; None when the input has no transcript for this audio
    split: str
    nbest: Optional[list] = None  # hypotheses given with the input (HyPoradise); None: sample them
    problem: Optional[str] = None  # why it cannot be used, found while reading the input (it is skipped)


AUDIO_EXTENSIONS = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm")
# column / field names accepted for each piece of information, first match wins
_AUDIO_KEYS = ("audio", "audio_path", "audio_filepath", "path", "file", "wav")
_TEXT_KEYS = ("text", "transcript", "transcription", "sentence", "ground_truth")
_ID_KEYS = ("id", "utt_id", "key", "uid")


def _first(record, keys):
    for k in keys:
        if record.get(k) not in (None, ""):
            return record[k]
    return None


def _resolve(path, base: Path) -> str:
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else base / p)


def _read_records(path: Path) -> list:
    """The records of a JSONL, JSON (a list of objects), CSV or TSV file, as dicts."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        if suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            records = json.loads(text)
            if isinstance(records, dict):  # {"utt id": {...}, ...}
                records = [{"id": k, **v} for k, v in records.items()]
        elif suffix in (".csv", ".tsv"):
            records = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise InputError(f"{path}: unknown manifest type {suffix!r} (use .jsonl, .json, .csv or .tsv)")
    except (json.JSONDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not valid {suffix[1:].upper()}: {e}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: expected one object per utterance")
    return records


def _is_hyporadise(records) -> bool:
    return bool(records) and isinstance(records[0].get("input"), list) and "output" in records[0]


def read_manifest(path, split="train") -> list:
    """A manifest: one utterance per record with its audio path and transcript, optionally an id and a
    split. Relative audio paths are relative to the manifest's folder."""
    path = Path(path)
    records = _read_records(path)
    if _is_hyporadise(records):
        return read_hyporadise(path, split)
    out = []
    for n, r in enumerate(records, 1):
        audio = _first(r, _AUDIO_KEYS)
        if audio is None:
            raise InputError(f"{path}: record {n} has no audio path (one of the fields {', '.join(_AUDIO_KEYS)})")
        text = _first(r, _TEXT_KEYS)
        utt_id = _first(r, _ID_KEYS) or Path(str(audio)).stem
        out.append(Utterance(str(utt_id), _resolve(audio, path.parent), None if text is None else str(text),
                             str(r.get("split") or split)))
    return out


def read_hyporadise(path, split="train", audio_dir=None) -> list:
    """HyPoradise-style n-best lists: records with "input" (the hypotheses), "output" (the ground truth) and
    an audio path (a field as in a manifest, or --audio-dir holding a file named after the record's id)."""
    path = Path(path)
    records = _read_records(path)
    out = []
    for n, r in enumerate(records, 1):
        if not isinstance(r.get("input"), list) or "output" not in r:
            raise InputError(f"{path}: record {n} lacks the n-best list 'input' or the transcript 'output'")
        utt_id = str(_first(r, _ID_KEYS) or f"{path.stem}-{n:06d}")
        audio = _first(r, _AUDIO_KEYS)
        if audio is not None:
            audio = _resolve(audio, path.parent)
        elif audio_dir is not None:
            found = [p for ext in AUDIO_EXTENSIONS if (p := Path(audio_dir) / f"{utt_id}{ext}").exists()]
            audio = str(found[0]) if found else str(Path(audio_dir) / f"{utt_id}.wav")
        else:
            raise InputError(f"{path}: record {n} has no audio path; add an 'audio' field or pass --audio-dir "
                             "with files named after the record ids")
        out.append(Utterance(utt_id, audio, str(r["output"]), str(r.get("split") or split),
                             [str(h) for h in r["input"]]))
    return out


def read_directory(root, split="train") -> list:
    """A folder of audio files with transcripts: a same-named .txt beside each audio file, or
    LibriSpeech-style <speaker>-<chapter>.trans.txt files with one "<utt id> <transcript>" per line.
    Audio without a transcript is listed with text None (and later skipped and counted)."""
    root = Path(root)
    transcripts = {}  # audio path without extension -> transcript
    for trans in sorted(root.rglob("*.trans.txt")):
        try:
            lines = trans.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(f"{trans}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                             "save it as UTF-8") from None
        for line in lines:
            if line.strip():
                utt_id, _, text = line.strip().partition(" ")
                transcripts[str(trans.parent / utt_id)] = text
    out = []
    for audio in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        stem = str(audio.with_suffix(""))
        text, problem = transcripts.get(stem), None
        if text is None and audio.with_suffix(".txt").is_file():
            try:
                text = audio.with_suffix(".txt").read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:  # this utterance only: the others are still prepared
                problem = "transcript not UTF-8"
        out.append(Utterance(audio.stem, str(audio), text, split, problem=problem))
    if not out:
        raise InputError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    return out


def read_inputs(path, split="train", audio_dir=None) -> list:
    """Whatever --manifest points at: a folder, a manifest, or a HyPoradise n-best file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        return read_directory(path, split)
    if audio_dir is not None or _is_hyporadise(_read_records(path)):
        return read_hyporadise(path, split, audio_dir)
    utterances = read_manifest(path, split)
    if not utterances:
        raise InputError(f"{path} lists no utterances")
    if all(u.text is None for u in utterances):  # a column missing or misnamed, not a few untranscribed files
        raise InputError(f"{path}: no record has a transcript (one of the fields {', '.join(_TEXT_KEYS)})")
    return utterances


# ----------------------------------------------------------------------------------------------------
# Word error rate
# ----------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """The paper's light normalisation: lowercase, remove . , - ? ' (then collapse spaces)."""
    return " ".join(re.sub(r"[.,\-?']", "", text.lower()).split())


def word_errors(reference, hypothesis) -> tuple:
    """(word errors, reference words): substitutions + deletions + insertions after a minimum edit-distance
    alignment of the whitespace-separated words (jiwer), for one pair of strings or summed over two lists of
    them. An empty reference has 0 words, and every hypothesis word is an insertion."""
    import jiwer

    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, out.hits + out.substitutions + out.deletions


def wer(references, hypotheses) -> float:
    """Corpus word error rate: total edits / total reference words, for strings or lists of them."""
    errors, words = word_errors(references, hypotheses)
    return errors / words


# ----------------------------------------------------------------------------------------------------
# Storage: one folder per split, features in memory-mapped .npy shards, a JSONL index
# ----------------------------------------------------------------------------------------------------
#
#   <out>/meta.json                   the settings the folder was prepared with (models, seed, samples, ...)
#   <out>/<split>/index.jsonl         one line per input utterance, in the order they were committed
#   <out>/<split>/features/NNNNNN.npy float16 (rows, 1500, W) encoder output of the feature model
#
# Work is committed a chunk at a time: the chunk's shard is written (temp file + rename), then all its
# index lines are appended with one write and fsync'ed. Each line carries its chunk number and the number
# of lines in that chunk, so a torn append (a crash inside the write) is recognised and dropped when the
# index is read back; a shard whose lines never made it is simply rewritten on the next run.



def _read_index(path: Path, repair=False) -> list:
    """The committed lines of an index: torn trailing lines and incomplete chunks dropped. With repair=True
    the file is rewritten (atomically) without them, so that later appends start on a clean line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(json.loads(line))
        except ValueError:  # empty or torn line
            continue
    counts = {}
    for e in lines:
        counts[e["chunk"]] = counts.get(e["chunk"], 0) + 1
    good = [e for e in lines if counts[e["chunk"]] == e["chunk_lines"]]
    if repair:
        text = "".join(json.dumps(e) + "\n" for e in good)
        if text.encode() != raw:
            write_atomic(path, text)
    return good


def _append_index(path: Path, lines):
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e) + "\n" for e in lines))
        f.flush()
        os.fsync(f.fileno())


def _save_shard(path: Path, features: np.ndarray):
    write_atomic(path, lambda f: np.save(f, features))


def _commit_chunk(split_dir: Path, chunk: int, features, lines):
    """Make one chunk durable: its feature shard (if any utterance survived), then its index lines."""
    if features is not None:
        _save_shard(split_dir / "features" / f"{chunk:06d}.npy", features)
    _append_index(split_dir / "index.jsonl", lines)


class PreparedDataset(torch.utils.data.Dataset):
    """The examples of one split of a prepared folder.

    Item i: dict(ids (T,) long, labels (T,) long with the prompt masked as IGNORE_INDEX,
    audio_features (F, W) float16 tensor, meta dict: id, text, hypotheses, one_best, oracle, ...).
    Features are read from memory-mapped shards, so the dataset never needs to fit in RAM.
    tokenizer: re-tokenise the prompts with this LLM tokenizer instead of using the stored ids (for an LLM
    other than the one the folder was prepared for)."""

    def __init__(self, root, split, tokenizer=None):
        self.root, self.split = Path(root), split
        index = self.root / split / "index.jsonl"
        if not index.exists():
            raise FileNotFoundError(f"{index} not found: prepare the data first (python prepare_data.py)")
        self.entries = [e for e in _read_index(index) if "skipped" not in e]
        empty = [e["id"] for e in self.entries if not e["hypotheses"]]
        if empty:  # folders from before the never-empty policy (select_hypotheses)
            raise ValueError(f"{index}: utterance {empty[0]} has an empty n-best list (prepared by an older "
                             "version): prepare the folder again")
        meta_path = self.root / "meta.json"
        self.meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.tokenizer = tokenizer
        self._shards = {}

    def __len__(self):
        return len(self.entries)

    def _shard(self, n):
        if n not in self._shards:
            path = self.root / self.split / "features" / f"{n:06d}.npy"
            try:
                self._shards[n] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:  # deleted, or cut short by a copy (mmap length > file size)
                reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
                raise InputError(f"{path}: unreadable feature shard ({reason}); delete it and prepare the folder "
                                 "again (python prepare_data.py redoes what is missing)") from None
        return self._shards[n]

    def __getitem__(self, i):
        e = self.entries[i]
        features = torch.from_numpy(np.array(self._shard(e["shard"])[e["row"]]))  # copy out of the mmap
        if self.tokenizer is not None:
            ids, labels = tokenize_example(self.tokenizer, e["hypotheses"], e["text"])
        else:
            ids = torch.tensor(e["ids"], dtype=torch.long)
            labels = ids.clone()
            labels[: e["prompt_len"]] = IGNORE_INDEX
        meta = {k: v for k, v in e.items() if k not in ("ids", "chunk", "chunk_lines", "shard", "row")}
        return {"ids": ids, "labels": labels, "audio_features": features, "meta": meta}


def collate(batch, pad_id=0):
    """Stack examples into a batch: ids right-padded with pad_id, labels with IGNORE_INDEX (so padding never
    counts in the loss), features (B, F, W), meta a list."""
    T = max(len(b["ids"]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["ids"])] = b["ids"]
        labels[i, : len(b["labels"])] = b["labels"]
    features = torch.stack([b["audio_features"] for b in batch])
    return {"ids": ids, "labels": labels, "audio_features": features, "meta": [b["meta"] for b in batch]}


# ----------------------------------------------------------------------------------------------------
# Preparing: n-best, 1-best, oracle, features and tokens per utterance
# ----------------------------------------------------------------------------------------------------


class PrepareError(ProjectError):
    """An output folder that cannot be (re)used, or models that cannot be loaded."""


@dataclass
class PrepareConfig:
    nbest_model: str = "tiny.en"  # Whisper that writes the hypotheses (name or checkpoint folder)
    feature_model: Optional[str] = None  # Whisper whose encoder gives the audio features; None: nbest_model
    llm: Optional[str] = None  # LLM checkpoint folder for the tokenizer; None: the embedded SmolLM2
    seed: int = 0
    samples: int = 200  # sampled transcripts per utterance (the paper's 200)
    keep: int = 15  # hypotheses kept per utterance (given n-best lists are capped too)
    temperature: tuple = (0.7, 0.8)
    keep_ground_truth: bool = False  # the paper removes the ground truth from the n-best list
    hypotheses: str = "logprob"  # the n-best list's text form: a key of HYPOTHESIS_FORMS
    batch_size: int = 8  # clips per encoder / greedy-decoder batch
    chunk_size: int = 32  # utterances per commit (and per feature shard)

    def settings(self) -> dict:
        """What decides the folder's content (batch and chunk sizes do not)."""
        d = asdict(self)
        d["feature_model"] = d["feature_model"] or d["nbest_model"]
        d["temperature"] = list(d["temperature"])
        for k in ("batch_size", "chunk_size"):
            d.pop(k)
        return d


# Settings that only decide what is derived from the stored samples (the n-best list's form and length,
# ground-truth removal, the LLM's tokens): a change re-derives the index in place, without sampling again.
DERIVED_SETTINGS = ("llm", "keep", "keep_ground_truth", "hypotheses")


class _Models:
    """The Whisper models and the LLM tokenizer, loaded on first need (a rerun with nothing left to do
    loads nothing)."""

    def __init__(self, cfg: PrepareConfig):
        try:
            self.nbest, self.whisper_tokenizer = load_whisper(cfg.nbest_model)
            feature_model = cfg.feature_model or cfg.nbest_model
            self.features = self.nbest if feature_model == cfg.nbest_model else load_whisper(feature_model)[0]
            self.tokenizer = load_llm_tokenizer(cfg.llm)
        except (OSError, ValueError, ProjectError) as e:  # missing checkpoints, bad conversions, tokenizers
            raise PrepareError(first_line(e)) from None
        self.nbest.eval()
        self.features.eval()


def load_llm_tokenizer(llm=None):
    """The LLM's tokenizer from its checkpoint folder (None: the embedded SmolLM2, converted on first use)."""
    return Tokenizer.from_dir(ensure_llm(llm))


def utterance_seed(seed: int, utt_id: str) -> int:
    """The sampling seed of one utterance: from the run's seed and the id only, so an utterance gets the same
    n-best list whatever else is in the corpus and whichever run (first or resumed) processes it."""
    return zlib.crc32(f"{seed}:{utt_id}".encode()) & 0x7FFFFFFF


def _check_utterance(u: Utterance):
    """(audio float32 16 kHz, None) or (None, reason it is skipped)."""
    if u.problem is not None:
        return None, u.problem
    if u.text is None:
        return None, "no transcript"
    if not u.text.strip():
        return None, "empty transcript"
    if not Path(u.audio).exists():
        return None, "audio not found"
    try:
        audio = load_audio(u.audio)
    except AudioError:  # unreadable, empty, silent, shorter than 0.1 s
        return None, "bad audio"
    if len(audio) > N_SAMPLES:
        return None, "longer than 30 s"
    return audio, None


@torch.inference_mode()
def _encode(model, audios):
    """Encoder output (B, F, W) for a list of 16 kHz clips of at most 30 s, as one batch."""
    batch = np.stack([pad_or_trim(a, N_SAMPLES) for a in audios])  # (B, 480000)
    return model.embed_audio(log_mel_spectrogram(batch, n_mels=model.dims.n_mels))


def _process_chunk(utts, models: _Models, cfg: PrepareConfig, chunk: int, progress, known=None):
    """Everything for one chunk of utterances. Returns (features (rows, F, W) float16 or None, index lines).
    known: {id: {"text", "temperatures", "samples"}} sampled before with the same settings (read_samples)."""
    known = known or {}

    checked = [(u, *_check_utterance(u)) for u in utts]
    good = [(u, a) for u, a, reason in checked if reason is None]
    records, feature_rows, reasons = {}, [], {u.id: reason for u, _, reason in checked}
    for b in range(0, len(good), cfg.batch_size):
        batch = good[b: b + cfg.batch_size]
        audios = [a for _, a in batch]
        with torch.inference_mode():
            feats = _encode(models.nbest, audios)  # (B, 1500, W)
            stored = feats if models.features is models.nbest else _encode(models.features, audios)
            one_best = decode_greedy(models.nbest, models.whisper_tokenizer, feats)
            for j, (u, audio) in enumerate(batch):
                if u.nbest is not None:  # given with the input (HyPoradise): no log-probabilities
                    drawn = {"temperatures": [], "samples": [(h, None, 1) for h in u.nbest]}
                elif known.get(u.id, {}).get("text") == u.text.strip():  # sampled before: the slow part, skipped
                    drawn = known[u.id]
                else:
                    drawn = sample_candidates(models.nbest, models.whisper_tokenizer, feats[j: j + 1],
                                              n_samples=cfg.samples, temperature=cfg.temperature,
                                              seed=utterance_seed(cfg.seed, u.id))
                record = _record(u, audio, drawn, one_best[j], SAMPLE_RATE)
                if _derive(record, cfg, models.tokenizer) is None:
                    reasons[u.id] = "no hypotheses"  # nothing but empty samples (e.g. silence)
                else:
                    records[u.id] = record
                    feature_rows.append(stored[j: j + 1].to(torch.float16).numpy())
                progress.update(1)
    lines, row = [], 0
    for u, _, _ in checked:
        if u.id not in records:
            lines.append({"id": u.id, "split": u.split, "audio": u.audio, "skipped": reasons[u.id]})
            if reasons[u.id] != "no hypotheses":
                progress.update(1)
        else:
            lines.append({**records[u.id], "shard": chunk, "row": row})
            row += 1
    for line in lines:
        line.update(chunk=chunk, chunk_lines=len(lines))
    return (np.concatenate(feature_rows) if feature_rows else None), lines


def _record(u: Utterance, audio, drawn, one_best, sample_rate) -> dict:
    """What sampling produced for one utterance, kept whole: the distinct samples with their log-probs and
    counts (so the n-best list can be re-derived in another form without sampling again), the greedy 1-best."""
    duration = len(audio) / sample_rate
    return {
        "id": u.id, "split": u.split, "audio": u.audio, "text": u.text.strip(),
        "duration": round(duration, 3), "n_frames": min(math.ceil(duration * FRAMES_PER_SECOND), N_AUDIO_FRAMES),
        "temperatures": [round(t, 4) for t in drawn["temperatures"]],
        "samples": [[t, None if lp is None else round(lp, 4), n] for t, lp, n in drawn["samples"]],
        "one_best": one_best, "one_best_wer": wer(u.text.strip(), one_best),
    }


def _derive(entry: dict, cfg: PrepareConfig, tokenizer) -> Optional[dict]:
    """Fill (in place) what an index entry derives from its stored samples: the n-best list in cfg's form, the
    ground-truth flags, the oracle and the prompt's token ids. None when no hypothesis is left."""
    text = entry["text"]
    hypotheses, logprobs, flags = select_hypotheses(entry["samples"], text, cfg.hypotheses, cfg.keep,
                                                    cfg.keep_ground_truth)
    if not hypotheses:
        return None
    wers = [wer(text, h) for h in hypotheses]
    best = int(np.argmin(wers))
    ids, labels = tokenize_example(tokenizer, hypotheses, text)
    entry.update(hypotheses=hypotheses, logprobs=logprobs, **flags, oracle=hypotheses[best], oracle_wer=wers[best],
                 ids=ids.tolist(), prompt_len=int((labels == IGNORE_INDEX).sum()))
    return entry


def _check_meta(out_dir: Path, cfg: PrepareConfig) -> bool:
    """meta.json records the settings; a folder prepared with other sampling settings is never mixed into.
    Returns True when only derived settings changed, so the committed entries must be re-derived."""
    path = out_dir / "meta.json"
    settings = cfg.settings()
    if not path.exists():
        write_atomic(path, json.dumps(settings, indent=2) + "\n")
        return False
    old = json.loads(path.read_text())
    old.setdefault("hypotheses", "logprob")  # folders from before the form was recorded
    changed = [k for k in settings if old.get(k) != settings[k]]
    fixed = [k for k in changed if k not in DERIVED_SETTINGS]
    if fixed:
        raise PrepareError(f"{out_dir} was prepared with other settings ({', '.join(fixed)}); "
                           "use another --out or the same settings")
    return bool(changed)


def rederive(out_dir, cfg: PrepareConfig, tokenizer=None):
    """Re-derive every committed entry of out_dir from its stored samples with cfg's derived settings (form,
    keep, ground-truth removal, LLM tokens), without sampling again; each index is rewritten atomically and
    meta.json last, so an interruption leaves a folder that a rerun re-derives again."""
    out_dir = Path(out_dir)
    tokenizer = tokenizer or load_llm_tokenizer(cfg.llm)
    for index in sorted(out_dir.glob("*/index.jsonl")):
        entries = _read_index(index, repair=True)
        for e in entries:
            if "skipped" in e:
                continue
            if "samples" not in e:
                raise PrepareError(f"{index} predates stored samples: prepare it again into a new --out")
            if _derive(e, cfg, tokenizer) is None:
                e["skipped"] = "no hypotheses"
        write_atomic(index, "".join(json.dumps(e) + "\n" for e in entries))
    write_atomic(out_dir / "meta.json", json.dumps(cfg.settings(), indent=2) + "\n")


def prepare(utterances, out_dir, cfg: PrepareConfig = PrepareConfig(), limit=None, progress=True,
            samples_from=None) -> dict:
    """Prepare `utterances` into out_dir, resuming where an earlier run stopped. Returns summary(out_dir).
    limit: at most this many utterances of each split. samples_from: a file written by export_samples, whose
    samples stand in for sampling the utterances it holds (same sampling settings required)."""
    known = read_samples(samples_from, cfg) if samples_from else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if _check_meta(out_dir, cfg):
        rederive(out_dir, cfg)
    by_split, seen, duplicates = {}, set(), {}
    for u in utterances:
        if u.id in seen:  # an id names one utterance: a second one would break resuming
            duplicates[u.split] = duplicates.get(u.split, 0) + 1
            continue
        seen.add(u.id)
        by_split.setdefault(u.split, []).append(u)
    todo = {}
    for split, utts in by_split.items():
        index = _read_index(out_dir / split / "index.jsonl", repair=True)
        done = {e["id"] for e in index}
        todo[split] = (max((e["chunk"] for e in index), default=-1) + 1,
                       [u for u in utts[:limit] if u.id not in done])
    total = sum(len(utts) for _, utts in todo.values())
    if total:
        models = _Models(cfg)
        with tqdm(total=total, desc="n-best + features", unit="utt", disable=not progress) as bar:
            for split, (next_chunk, utts) in todo.items():
                for c in range(0, len(utts), cfg.chunk_size):
                    chunk = next_chunk + c // cfg.chunk_size
                    features, lines = _process_chunk(utts[c: c + cfg.chunk_size], models, cfg, chunk, bar, known)
                    _commit_chunk(out_dir / split, chunk, features, lines)
    result = summary(out_dir)
    for split, n in duplicates.items():
        result.setdefault(split, {"utterances": 0, "skipped": {}})["skipped"]["duplicate id"] = n
    return result


# What decides the samples themselves; a samples file is usable only with the same values.
SAMPLING_SETTINGS = ("nbest_model", "seed", "samples", "temperature")


def export_samples(out_dir, path) -> int:
    """Write every prepared utterance's raw samples (with the sampling settings in a first line) to `path`, a
    JSONL file, xz-compressed when it ends in .xz: the expensive part of preparing, small enough to keep (900
    demo utterances: 1.4 MB), so that another machine prepares the folder again without sampling
    (prepare(..., samples_from=path)). Returns the number of utterances written."""
    import lzma

    out_dir, path = Path(out_dir), Path(path)
    settings = json.loads((out_dir / "meta.json").read_text())
    lines = [json.dumps({"settings": {k: settings[k] for k in SAMPLING_SETTINGS}})]
    for index in sorted(out_dir.glob("*/index.jsonl")):
        for e in _read_index(index):
            if "samples" in e and "skipped" not in e:
                lines.append(json.dumps({k: e[k] for k in ("id", "split", "text", "temperatures", "samples")},
                                        ensure_ascii=False))
    data = ("\n".join(lines) + "\n").encode()
    write_atomic(path, lzma.compress(data) if path.suffix == ".xz" else data)
    return len(lines) - 1


def read_samples(path, cfg: PrepareConfig) -> dict:
    """{id: {"text", "temperatures", "samples"}} from a file written by export_samples; refused (one line) when it
    was sampled with other settings than cfg's."""
    import lzma

    path = Path(path)
    try:
        raw = path.read_bytes()
        lines = (lzma.decompress(raw) if path.suffix == ".xz" else raw).decode("utf-8").splitlines()
        header = json.loads(lines[0])["settings"]
        entries = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, lzma.LZMAError, UnicodeDecodeError, ValueError, KeyError, IndexError) as e:
        raise PrepareError(f"{path}: not a samples file written by --export-samples ({type(e).__name__})") from None
    wanted = {k: cfg.settings()[k] for k in SAMPLING_SETTINGS}
    if header != wanted:
        other = [k for k in SAMPLING_SETTINGS if header.get(k) != wanted[k]]
        raise PrepareError(f"{path} was sampled with other settings ({', '.join(other)}): {header}")
    return {e["id"]: {"text": e["text"], "temperatures": e["temperatures"],
                      "samples": [tuple(s) for s in e["samples"]]} for e in entries}


def summary(out_dir) -> dict:
    """Per split: utterances prepared, skipped (by reason), 1-best and oracle WER (raw and normalised)."""
    out_dir = Path(out_dir)
    result = {}
    for index in sorted(out_dir.glob("*/index.jsonl")):
        entries = _read_index(index)
        kept = [e for e in entries if "skipped" not in e]
        skipped = {}
        for e in entries:
            if "skipped" in e:
                skipped[e["skipped"]] = skipped.get(e["skipped"], 0) + 1
        s = {"utterances": len(kept), "skipped": skipped,
             "ground_truth_kept": sum(bool(e.get("ground_truth_kept")) for e in kept)}
        if kept:
            refs = [e["text"] for e in kept]
            for name, hyps in (("one_best", [e["one_best"] for e in kept]), ("oracle", [e["oracle"] for e in kept])):
                s[f"{name}_wer"] = wer(refs, hyps)
                s[f"{name}_wer_normalized"] = wer([normalize_text(r) for r in refs],
                                                  [normalize_text(h) for h in hyps])
        result[index.parent.name] = s
    return result


def format_summary(result) -> str:
    rows = [f"{'split':<8}{'utterances':>11}{'skipped':>9}{'1-best WER':>12}{'oracle WER':>12}"
            f"{'1-best norm.':>14}{'oracle norm.':>14}"]
    order = {"train": 0, "dev": 1, "test": 2}
    reasons = {}
    for split in sorted(result, key=lambda s: (order.get(s, 3), s)):
        s = result[split]
        pct = lambda k: f"{100 * s[k]:.2f}%" if k in s else "-"  # noqa: E731
        rows.append(f"{split:<8}{s['utterances']:>11}{sum(s['skipped'].values()):>9}{pct('one_best_wer'):>12}"
                    f"{pct('oracle_wer'):>12}{pct('one_best_wer_normalized'):>14}{pct('oracle_wer_normalized'):>14}")
        for r, n in s["skipped"].items():
            reasons[r] = reasons.get(r, 0) + n
    kept_gt = sum(s.get("ground_truth_kept", 0) for s in result.values())
    if kept_gt:
        rows.append(f"ground truth kept (the only distinct hypothesis): {kept_gt} utterances")
    if reasons:
        rows.append("skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())))
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parent / "data"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Turn speech + transcripts into what train.py and evaluate.py read: per utterance the Whisper "
                    "n-best list (200 samples at temperature 0.7-0.8, top 15 by log-probability or the reference "
                    "code's form, ground truth removed), the greedy 1-best, the oracle, encoder features "
                    "(float16) and the tokenised Alpaca prompt. With no --manifest, synthesises the embedded demo corpus (ATIS-like flight "
                    "requests spoken by eSpeak NG) into data/demo. Reruns resume where the last run stopped.")
    parser.add_argument("--manifest", help="a manifest (.jsonl/.json/.csv/.tsv with audio path and transcript, "
                                           "optional id and split), a folder of audio files with .txt or "
                                           "LibriSpeech *.trans.txt transcripts, or a HyPoradise n-best JSON "
                                           "(records with 'input' and 'output'); default: the demo corpus")
    parser.add_argument("--out", help="output folder (default data/demo, or data/<manifest name>)")
    parser.add_argument("--split", default="train", help="split of inputs that do not name one (default train)")
    parser.add_argument("--audio-dir", help="for n-best JSON without audio paths: folder of <id>.<ext> files")
    parser.add_argument("--llm", help="LLM checkpoint folder whose tokenizer encodes the prompts "
                                      "(default: the embedded SmolLM2-135M-Instruct, converted on first use)")
    parser.add_argument("--nbest-model", default="tiny.en", help="Whisper that samples the hypotheses")
    parser.add_argument("--feature-model", help="Whisper whose encoder gives the audio features "
                                                "(default: the --nbest-model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=200, help="transcripts sampled per utterance")
    parser.add_argument("--keep", type=int, default=15, help="hypotheses kept per utterance")
    parser.add_argument("--keep-ground-truth", action="store_true",
                        help="keep the ground truth in the n-best list when it was sampled (the paper removes it)")
    parser.add_argument("--hypotheses", choices=list(HYPOTHESIS_FORMS), default="logprob",
                        help="the n-best list's text form: " + "; ".join(f"{k}: {v}" for k, v in
                                                                        HYPOTHESIS_FORMS.items())
                             + ". Changing it (or --keep, --keep-ground-truth, --llm) on a prepared folder "
                               "re-derives the lists from the stored samples without sampling again")
    parser.add_argument("--limit", type=int, help="at most this many utterances of each split")
    parser.add_argument("--export-samples", metavar="FILE",
                        help="write the prepared --out folder's raw samples to FILE (.jsonl, or .jsonl.xz) and exit")
    parser.add_argument("--samples-from", metavar="FILE",
                        help="use the samples in FILE (from --export-samples, same sampling settings) instead of "
                             "sampling the utterances it holds: the folder is prepared again without the slow part")
    parser.add_argument("--heldout", action="store_true",
                        help="instead of the demo corpus: its held-out test set (hand-written in-domain sentences the "
                             "grammar never produces, in a voice it never uses) → data/demo-heldout")
    parser.add_argument("--demo-size", type=int, default=3000, help="sentences in the demo corpus (80/10/10 split)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per encoder batch")
    parser.add_argument("--chunk-size", type=int, default=32, help="utterances per commit and feature shard")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    cfg = PrepareConfig(nbest_model=args.nbest_model, feature_model=args.feature_model, llm=args.llm,
                        seed=args.seed, samples=args.samples, keep=args.keep,
                        keep_ground_truth=args.keep_ground_truth, hypotheses=args.hypotheses,
                        batch_size=args.batch_size,
                        chunk_size=args.chunk_size)
    try:
        if args.limit is not None and args.limit < 1:
            raise InputError("--limit must be at least 1")
        if args.export_samples:
            out = Path(args.out or DATA / "demo")
            if not (out / "meta.json").is_file():
                raise InputError(f"{out} is not a prepared folder (no meta.json)")
            n = export_samples(out, args.export_samples)
            print(f"wrote the samples of {n} utterances to {args.export_samples}")
            return
        if args.heldout:
            out = Path(args.out or DATA / "demo-heldout")
            utterances = read_manifest(build_heldout_corpus(out, args.seed))
        elif args.manifest is None:
            out = Path(args.out or DATA / "demo")
            manifest = build_demo_corpus(out, args.demo_size, args.seed, args.limit)
            utterances = read_manifest(manifest)
        else:
            out = Path(args.out or DATA / Path(args.manifest).name.split(".")[0])
            utterances = read_inputs(args.manifest, args.split, args.audio_dir)
        result = prepare(utterances, out, cfg, limit=args.limit, samples_from=args.samples_from)
    except (ProjectError, OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # every committed chunk is on disk; the chunk in progress is redone
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    print(f"prepared {out}")
    print(format_summary(result))


if __name__ == "__main__":
    main()
