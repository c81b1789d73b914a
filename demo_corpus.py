"""The embedded demo corpus: ATIS-like flight requests from a grammar, spoken by eSpeak NG.

    grammar (TEMPLATES, slots) ──► demo_sentences ──► splits (80/10/10) ──► speakable text
        ──► eSpeak NG (a voice, rate and pitch per utterance) ──► 16 kHz + mild noise ──► audio/<split>/<id>.flac
    + manifest.jsonl, which prepare_data.py reads like any other manifest

Sections: speech synthesis (eSpeak NG through ctypes, over the library shipped by PyPI `espeakng-loader`),
the grammar, rendering, and the held-out set (hand-written sentences in a voice the corpus never uses).
prepare_data.py imports this file only when it builds a demo folder, so the scripts that import
prepare_data.py for the prompt and the dataset never load ctypes code.
"""
import _ctypes
import atexit
import ctypes
import json
import os
import random
import re
import shutil
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from storage import InputError, ProjectError, write_atomic


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
