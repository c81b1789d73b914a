"""Correct a speech transcript with Whispering-LLaMA, or generate text with the plain LLM.

    python generate.py --audio x.wav                      # Whisper n-best + audio features → corrected transcript
    python generate.py --audio x.wav --verbose            # ... also the n-best list and the Whisper 1-best
    python generate.py --audio clips/ --json              # a folder (or several files, or a manifest)
    python generate.py --audio clips/ --out r.jsonl       # ... also appended to r.jsonl; a rerun resumes
    python generate.py --audio x.wav --explain x.png      # ... and draw where each word listened and what it read
    python generate.py --prompt "The capital of France is"            # plain continuation, greedy
    python generate.py --prompt "What is 2+2?" --chat                  # wrapped in the model's chat template
    python generate.py --prompt "Once upon a time" --temperature 0.8 --top-k 50 --seed 1

With --audio: the hypothesis model (--whisper, default the embedded tiny.en) samples the paper's n-best list
(200 samples, 15 kept), the feature model's encoder gives the audio features, and the adapter (default: the
best checkpoint of the latest training run under out/) decodes greedily; the corrected transcript is the
response up to its first newline (--decode greedy, the paper's), or by default the likeliest, under the adapter
model, of that output and the n-best hypotheses (--decode likeliest, DECODES). Audio longer than 30 s is corrected
in 30 s windows, joined. A file that cannot be read gets one `error:` line (an error record with --json) and the
others still run; the exit status is 1 if any failed. With no trained adapter the Whisper 1-best is printed with a
one-line notice: an untrained fusion (gate_W = 1) would only garble it. With --explain (or --explain-dir) each
window's correction is decoded again as correct() decodes it (decode_correction) and handed to explain.py, which
draws where each corrected token listened and what it read (explain_file).
With --prompt and no --checkpoint-dir the embedded SmolLM2-135M-Instruct is used (converted on first use).

Decoding (`generate`) uses the KV cache: the prompt is run once in a single forward pass that fills the
cache (prefill), then each new token costs one forward pass over that token alone.
"""
import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from tqdm import tqdm

import convert_checkpoint
import explain
import whisper_model as wm
from model import LLaMA
from prepare_data import AUDIO_EXTENSIONS, HYPOTHESIS_FORMS, InputError, encode_prompt, encode_response, \
    read_manifest, select_hypotheses
from storage import ProjectError, first_line, write_atomic
from tokenizer import Tokenizer
from wl_checkpoint import build_model, load_adapter_state, merge_settings, read_adapter_file, read_adapter_meta

# Chat prompt formats. {system} and {prompt} are filled in; BOS is added by the tokenizer where the model
# uses one (tokenizer.add_bos: LLaMA-2's "<s>", LLaMA-3's "<|begin_of_text|>").
CHAT_FORMATS = {
    # ChatML, as SmolLM2-Instruct was trained (its template inserts this system turn when none is given).
    "chatml": dict(
        template="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                 "<|im_start|>assistant\n",
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        end_of_turn="<|im_end|>",
    ),
    "llama-2": dict(
        template="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST]",
        template_no_system="[INST] {prompt} [/INST]",
        default_system=None,
        end_of_turn=None,  # the answer ends with EOS
    ),
    "llama-3": dict(
        template="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
        template_no_system="<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n",
        default_system=None,
        end_of_turn="<|eot_id|>",
    ),
}


class GenerateError(ProjectError):
    """Bad input to generation (empty prompt, prompt longer than the model's context, ...)."""


def cpu_bf16_is_faster(n: int = 512, repeats: int = 8) -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 ones (measured now, ~0.1 s). With AVX512-BF16
    or AMX it does (4.5× here; bf16 training steps run 2× faster, bench/train_speed.py, and a correction 1.25×,
    bench/generate_latency.py); without them bf16 matmuls are emulated and run several times slower than fp32."""
    def seconds(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return time.perf_counter() - t0

    return seconds(torch.bfloat16) < seconds(torch.float32)


def audio_dtype(name: str, device: str) -> torch.dtype:
    """--dtype for --audio. "auto": bf16 where it is the faster choice (a CPU with native bf16 matmuls, a GPU that
    supports bf16), else fp32. On the demo dev split bf16 gave the same WER as fp32 (39 of 40 outputs identical)."""
    if name != "auto":
        return getattr(torch, name)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if str(device) == "cpu" and cpu_bf16_is_faster() else torch.float32


def load_llm(checkpoint_dir=None, device="cpu", dtype=None):
    """(model, tokenizer) from a converted checkpoint folder; the embedded SmolLM2 when None."""
    checkpoint_dir = convert_checkpoint.ensure_llm(checkpoint_dir)
    model = LLaMA.from_checkpoint(checkpoint_dir, device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.from_dir(checkpoint_dir)
    return model, tokenizer


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None) -> torch.Tensor:
    """One token id from logits (vocab,). temperature 0 or top_k 1 is greedy (argmax)."""
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)


def prefill(model, idx: torch.Tensor, audio=None, audio_frames=None) -> torch.Tensor:
    """Run the whole prompt idx (T,) in one pass into the KV cache (set_kv_cache first); returns the logits (vocab,)
    of its last position, the only ones needed. audio, for a WhisperingLLaMA, goes with this pass only: the
    model caches its keys/values for the passes that follow."""
    T = idx.size(0)
    last = torch.zeros(1, T, dtype=torch.bool, device=idx.device)
    last[0, -1] = True
    kwargs = dict(input_pos=torch.arange(T, device=idx.device), logits_mask=last)
    if audio is not None:
        kwargs.update(audio=audio, audio_frames=audio_frames)
    return model(idx[None], **kwargs)[-1]


@torch.inference_mode()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             eos_id: Union[int, Iterable[int], None] = None, audio: Optional[torch.Tensor] = None,
             audio_frames: Optional[int] = None, done: Optional[Callable[[list], bool]] = None) -> torch.Tensor:
    """Extend the prompt idx (T,) by up to max_new_tokens tokens; returns (T + n,).

    Generation stops when a token in eos_id (one id or several, e.g. EOS and an end-of-turn token) is
    drawn; that token is not included. done(new ids so far) may stop it earlier, after the token that made it
    true (correct() stops once the transcript's line is complete). audio (1, F, W), for a WhisperingLLaMA: the
    encoder features go to the prefill forward only (the model caches their keys/values for the later steps),
    with audio_frames, the frames that carry audio (used by adapters trained with trim_audio)."""
    if idx.dim() != 1 or idx.numel() == 0:
        raise GenerateError("the prompt must be a non-empty 1-D tensor of token ids")
    T = idx.size(0)
    max_len = min(T + max_new_tokens, model.config.block_size)
    if T >= model.config.block_size:
        raise GenerateError(f"the prompt has {T} tokens; the model's context is {model.config.block_size}")
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = idx.device
    model.set_kv_cache(batch_size=1, max_seq_length=max_len, device=device)
    try:
        logits = prefill(model, idx, audio, audio_frames)
        tokens = [idx]
        for pos in range(T, max_len):
            next_id = sample(logits, temperature, top_k)  # (1,)
            if next_id.item() in stop:
                break
            tokens.append(next_id)
            if pos + 1 == max_len or (done is not None and done([int(t) for t in tokens[1:]])):
                break  # the last token's logits would never be used
            logits = model(next_id[None], input_pos=torch.tensor([pos], device=device))[0, -1]
    finally:
        model.clear_kv_cache()
    return torch.cat(tokens)


def chat_format_for(model_name: str) -> str:
    """The chat format a model was trained with, from its config name."""
    name = model_name.lower()
    if name.startswith("smollm"):
        return "chatml"
    if name.startswith("llama-3"):
        return "llama-3"
    return "llama-2"


def chat_prompt(prompt: str, fmt: str, system: Optional[str] = None) -> str:
    """Wrap a user message in a chat format (see CHAT_FORMATS)."""
    spec = CHAT_FORMATS[fmt]
    system = system if system is not None else spec["default_system"]
    if system is None:
        return spec["template_no_system"].format(prompt=prompt)
    return spec["template"].format(system=system, prompt=prompt)


def stop_ids(tokenizer, fmt: Optional[str]) -> list:
    """EOS, plus the chat format's end-of-turn token when it is a single token of this vocabulary."""
    ids = [tokenizer.eos_id]
    if fmt is not None and CHAT_FORMATS[fmt]["end_of_turn"]:
        end = tokenizer.encode(CHAT_FORMATS[fmt]["end_of_turn"], bos=False, eos=False).tolist()
        if len(end) == 1:
            ids.append(end[0])
    return ids


def continuation(tokenizer, prompt_ids: torch.Tensor, ids: torch.Tensor) -> str:
    """The text of the new tokens. Decoding them alone can drop a leading space (SentencePiece strips the
    first piece's '▁'), so decode everything and cut off the prompt's text when it is a prefix."""
    full, head = tokenizer.decode(ids), tokenizer.decode(prompt_ids)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(ids[len(prompt_ids):])


# ----------------------------------------------------------------------------------------------------
# Whispering-LLaMA: audio → n-best + features → corrected transcript
# ----------------------------------------------------------------------------------------------------

OUT = Path(__file__).resolve().parent / "out"
# The demo adapter that ships with the repository: WL-M trained by train.py on the embedded models and the demo
# corpus (its metadata records the command, the commit and the data); used when out/ holds no training run.
DEMO_ADAPTER = Path(__file__).resolve().parent / "adapters" / "wl-m-demo.safetensors"


def default_adapter() -> Optional[Path]:
    """The adapter generate.py and evaluate.py use when none is given: the best checkpoint of the latest
    training run under out/, else the shipped demo adapter, else None."""
    return find_latest_adapter() or (DEMO_ADAPTER if DEMO_ADAPTER.is_file() else None)


def find_latest_adapter(root=None) -> Optional[Path]:
    """The newest best.safetensors of a training run under `root` (default out/), else the newest adapter file
    there. Adapters of the --random-audio ablation are passed over: they hear noise instead of the clip."""
    root = Path(root or OUT)
    if not root.is_dir():
        return None

    def meta(p):
        try:
            return read_adapter_meta(p)
        except (OSError, ValueError):  # a damaged file is nobody's default; naming it with --adapter reports it
            return None

    def hears_noise(m):
        return bool(((m or {}).get("config") or {}).get("random_audio"))

    def newest_first(paths):  # only as many headers are read as it takes to find one
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)

    best = next((p for p in newest_first(root.rglob("best.safetensors")) if not hears_noise(meta(p))), None)
    return best or next((p for p in newest_first(root.rglob("*.safetensors"))
                         if (m := meta(p)) and not hears_noise(m)), None)


def say(text: str) -> Path:
    """out/say/<hash of text>.flac: `text` spoken by eSpeak NG as a held-out demo utterance (a voice the demo
    corpus never uses, mild noise), made once."""
    # Imported here, as prepare_data.py imports it: demo_corpus makes its eSpeak ctypes callback at import, which
    # only --say needs (evaluate.py and the tests import generate.py without it).
    from demo_corpus import DEMO_SAMPLE_RATE, HELDOUT_VOICE, _write_audio_atomic, demo_utterance_settings, \
        render_demo_utterance

    path = OUT / "say" / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.flac"
    if not path.exists():
        settings = {**demo_utterance_settings(path.stem), "voice": HELDOUT_VOICE}
        _write_audio_atomic(path, render_demo_utterance(text, settings), DEMO_SAMPLE_RATE)
    return path


# Adapter settings a user may give when the file leaves them open (a file that fixes them refuses others).
ADAPTER_FLAGS = {"kv_layout": "--kv-layout", "variant": "--variant", "adapter_prompt_length": "--prompt-length",
                 "adapter_start_layer": "--start-layer", "hypotheses": "--hypotheses"}


def load_wl(adapter=None, llm=None, whisper=None, device="cpu", dtype=None, **requested):
    """(model, tokenizer) of a trained Whispering-LLaMA.

    adapter: a file saved by wl_checkpoint.save_adapter (train.py's checkpoints), whose metadata names the adapter
    config, the n-best form and the LLM / Whisper it was trained with (`llm` / `whisper` override the last two),
    or a .pth of the reference research code, whose names and shapes determine its layout ("paper"), variant,
    prompt length and start layer. requested: ADAPTER_FLAGS settings for what the file leaves open.
    `whisper` is a whisper_model.Whisper or a name/folder: the model whose decoder cross-attention AiW copies
    (the feature model). model.hypothesis_form is the n-best text form its prompts must use."""
    adapter = Path(adapter)
    if not adapter.is_file():
        raise GenerateError(f"adapter checkpoint {adapter} not found")
    meta = read_adapter_meta(adapter) if adapter.suffix == ".safetensors" else {}
    state, settings = read_adapter_file(adapter)  # a damaged or foreign file: a one-line ValueError
    try:
        settings = merge_settings(adapter, settings, requested)
    except ValueError as e:
        flag = next((f for k, f in ADAPTER_FLAGS.items() if f"with {k}=" in str(e)), None)
        raise GenerateError(f"{e} ({flag})" if flag else str(e)) from None
    form = settings.pop("hypotheses", "logprob")
    llm_dir = convert_checkpoint.ensure_llm(llm or meta.get("llm") or None)
    if whisper is None or isinstance(whisper, (str, Path)):
        whisper, _ = convert_checkpoint.load_whisper(whisper or meta.get("whisper") or "tiny.en", device=device)
    model = build_model(llm_dir, whisper if settings.get("use_whisper", True) else None, device=device, **settings)
    try:
        load_adapter_state(model, state)
    except ValueError as e:  # e.g. an adapter trained on another LLM's width: name the file
        raise GenerateError(f"{adapter}: {e}") from None
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    model.hypothesis_form = form
    return model, Tokenizer.from_dir(llm_dir)


def response_text(text: str) -> str:
    """The corrected transcript: the response up to its first newline (the paper's post-processing)."""
    return text.strip().split("\n")[0].strip()


def first_line_done(tokenizer) -> Callable[[list], bool]:
    """For generate(done=...): True once the response holds a newline after some text. Whatever follows can no
    longer change response_text(), so decoding it is wasted (the demo adapter, out of its domain, can write 150
    tokens past the transcript's line instead of EOS). Only a token whose text holds a newline is checked."""
    def done(new_ids: list) -> bool:
        return "\n" in tokenizer.decode(new_ids[-1:]) and "\n" in tokenizer.decode(new_ids).lstrip()
    return done


DECODES = {
    "greedy": "the paper's decoding: the greedy continuation, up to its first newline",
    "likeliest": "the greedy continuation competes with the n-best hypotheses: the one the model itself finds "
                 "likeliest as the response (log-probability summed over its tokens and EOS) is the output. "
                 "Greedy search can miss a likelier response (jfk.flac: the greedy output scores -4.98, Whisper's "
                 "1-best -3.63); this costs one short pass per hypothesis after the prefill",
}


@dataclass
class Correction:
    """One utterance's correction as decoded: correct() returns its text, explain.py explains it."""
    text: str  # the corrected transcript, as generate.py prints it
    greedy_text: str  # the greedy output's first line (text differs where --decode likeliest chose a hypothesis)
    decode: str  # the key of DECODES that chose text
    token_ids: torch.Tensor  # (n,) the response as the model reads it: the greedy tokens, or the chosen hypothesis'
    ended_with_eos: bool  # whether EOS follows token_ids (decoding stopped on it; a chosen hypothesis always ends so)


@torch.inference_mode()
def correct(model, tokenizer, hypotheses, audio_features, max_new_tokens: int = 150, audio_frames=None,
            decode: str = "greedy") -> str:
    """One utterance: its n-best hypotheses and audio features (F, W) or (1, F, W) → corrected transcript.
    Greedy decoding with the KV cache; the audio's keys/values are computed once, at the prefill.
    audio_frames: encoder frames that carry the audio (ceil(seconds · 50)), for adapters with trim_audio.
    decode: a key of DECODES."""
    return decode_correction(model, tokenizer, hypotheses, audio_features, max_new_tokens, audio_frames, decode).text


@torch.inference_mode()
def decode_correction(model, tokenizer, hypotheses, audio_features, max_new_tokens: int = 150, audio_frames=None,
                      decode: str = "greedy") -> Correction:
    """correct()'s work, with what explain.py needs to read the response back: the greedy output's text, its
    tokens and how its decoding stopped. audio_features may be None for a text-only adapter."""
    if not hypotheses:
        raise GenerateError("no hypotheses to correct")
    if decode not in DECODES:
        raise GenerateError(f"unknown decoding {decode!r} (choose from {', '.join(DECODES)})")
    param = next(model.parameters())
    audio = None if audio_features is None else \
        (audio_features if audio_features.dim() == 3 else audio_features[None]).to(param.device)
    prompt_ids = encode_prompt(tokenizer, hypotheses).to(param.device)  # exactly as in training
    new, ended_with_eos = greedy_response(model, tokenizer, prompt_ids, audio, max_new_tokens, audio_frames)
    greedy_text = text = response_text(tokenizer.decode(new))
    if decode == "likeliest":
        text = likeliest(model, tokenizer, hypotheses, audio, greedy_text, audio_frames)
        if text != greedy_text:  # a hypothesis won: the response the model reads is that hypothesis, then EOS
            new = tokenizer.encode(text, bos=False, eos=False, special=False).to(param.device)
            ended_with_eos = True
    return Correction(text, greedy_text, decode, new, ended_with_eos)


def greedy_response(model, tokenizer, prompt_ids, audio=None, max_new_tokens: int = 150, audio_frames=None):
    """The paper's decoding: the greedy response's token ids (n,), up to its first complete line (EOS, when drawn
    first, is not included), and whether EOS ended it. audio (1, F, W) or None."""
    done = first_line_done(tokenizer)
    ids = generate(model, prompt_ids, max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id, audio=audio,
                   audio_frames=audio_frames, done=done)
    new = ids[len(prompt_ids):]
    # generate() stops at EOS, at the length limit (max_new_tokens, the context) or once done(): the last two are
    # seen in the tokens it returns, so EOS ended it when neither holds.
    at_limit = len(new) >= max_new_tokens or len(ids) >= model.config.block_size
    return new, not at_limit and not (len(new) and done(new.tolist()))


@torch.inference_mode()
def likeliest(model, tokenizer, hypotheses, audio_features, greedy_text: str, audio_frames=None) -> str:
    """DECODES["likeliest"]: of the greedy output and the n-best hypotheses, the one the model scores highest
    as the response to this prompt and audio (the greedy output wins ties)."""
    device = next(model.parameters()).device
    audio = None if audio_features is None else \
        (audio_features if audio_features.dim() == 3 else audio_features[None]).to(device)
    prompt_ids = encode_prompt(tokenizer, hypotheses).to(device)
    candidates = list(dict.fromkeys([greedy_text, *hypotheses]))
    responses = [encode_response(tokenizer, c).to(device) for c in candidates]  # as training targets them
    scores = response_logprobs(model, prompt_ids, responses, audio, audio_frames)
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


@torch.inference_mode()
def response_logprobs(model, prompt_ids: torch.Tensor, responses, audio=None, audio_frames=None) -> list:
    """log P(response | prompt, audio) under the model, summed over the response's tokens, for each response
    (token ids, EOS included). The prompt is prefilled once into the KV cache; then each response is read in
    one pass after it. Every response writes the same cache positions T, T+1, ...: the causal mask keeps a
    response from seeing what an earlier, longer one left beyond its own length."""
    T, device = prompt_ids.size(0), prompt_ids.device
    longest = max(r.size(0) for r in responses)
    if T + longest > model.config.block_size:
        raise GenerateError(f"prompt + response ({T} + {longest} tokens) exceed the model's context")
    model.set_kv_cache(batch_size=1, max_seq_length=T + longest, device=device)
    try:
        first = torch.log_softmax(prefill(model, prompt_ids, audio, audio_frames).float(), dim=-1)  # P(first token)
        scores = []
        for r in responses:
            logp = first[r[0]]
            if r.size(0) > 1:  # tokens 1.. are predicted from the response's own earlier tokens
                logits = model(r[None, :-1], input_pos=torch.arange(T, T + r.size(0) - 1, device=device))[0]
                logp = logp + torch.log_softmax(logits.float(), dim=-1).gather(-1, r[1:, None]).sum()
            scores.append(logp.item())
    finally:
        model.clear_kv_cache()
    return scores


def audio_inputs(paths) -> list:
    """--audio arguments → what to transcribe, in order: files as given, folders searched for audio, manifests
    read. An argument that gives no file becomes (argument, problem) in its place: it is reported when its turn
    comes, and the others still run."""
    items = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS and f.is_file())
            items += found or [(p, f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")]
        elif p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv") and p.is_file():
            try:
                items += [Path(u.audio) for u in read_manifest(p)]
            except InputError as e:  # its message starts with the manifest's path
                items.append((p, str(e).removeprefix(f"{p}: ")))
        else:
            items.append(p)  # a missing file is reported by load_audio, in its turn
    return items


def windows(audio) -> list:
    """Consecutive windows of at most 30 s (whisper_model.windows): Whisper's encoder sees 30 s at a time."""
    return wm.windows(audio) or [audio]


WINDOW_BATCH = 8  # 30 s windows encoded together: a long recording is not held as one (hours, F, W) batch


def transcribe_and_correct(path, hyp_model, hyp_tok, feat_model, wl, tokenizer, args) -> dict:
    """One audio file → dict(file, one_best, nbest, corrected) with 30 s windows joined by spaces.
    The n-best list of each window is in the adapter's hypothesis form (prepare_data.HYPOTHESIS_FORMS)."""
    audio = wm.load_audio(path)
    pieces = windows(audio)
    one_best, nbest, corrected = [], [], []
    form = getattr(wl, "hypothesis_form", "logprob")  # the n-best text form the adapter was trained on
    for b in range(0, len(pieces), WINDOW_BATCH):
        batch = pieces[b:b + WINDOW_BATCH]
        mels = torch.stack([wm.log_mel_spectrogram(w, hyp_model.dims.n_mels) for w in batch])
        with torch.inference_mode():
            feats = hyp_model.embed_audio(mels)  # the encoder runs once for all windows of the batch
            one_best += wm.decode_greedy(hyp_model, hyp_tok, feats)
            if wl is None or feat_model is hyp_model:
                wl_feats = feats
            else:  # another encoder; the same log-mel input unless it wants another number of mel bins
                n_mels = feat_model.dims.n_mels
                wl_mels = mels if n_mels == hyp_model.dims.n_mels else \
                    torch.stack([wm.log_mel_spectrogram(w, n_mels) for w in batch])
                wl_feats = feat_model.embed_audio(wl_mels)
        if wl is None and not args.verbose:
            continue
        for i, piece in enumerate(batch):
            drawn = wm.sample_candidates(hyp_model, hyp_tok, feats[i:i + 1], n_samples=args.samples, seed=args.seed)
            hyps, logprobs, _ = select_hypotheses(drawn["samples"], None, form, keep=args.nbest)
            nbest.append([dict(text=t, logprob=lp) for t, lp in zip(hyps, logprobs)])
            if wl is not None:
                if not hyps:  # Whisper wrote nothing but empty samples (silence): nothing to correct
                    corrected.append(one_best[b + i])
                    continue
                corrected.append(correct(wl, tokenizer, hyps, wl_feats[i], args.max_new_tokens,
                                         audio_frames=wm.encoder_frames(len(piece)), decode=args.decode))
    result = dict(file=str(path), one_best=" ".join(t.strip() for t in one_best).strip(), nbest=nbest,
                  corrected=None)
    if wl is not None:
        result["corrected"] = " ".join(c for c in corrected if c).strip()
    return result


def adapter_requests(args) -> dict:
    """The ADAPTER_FLAGS given on the command line (None: not given)."""
    return {k: getattr(args, k) for k in ADAPTER_FLAGS}


def add_adapter_flags(parser):
    """Settings for adapter files that do not record them (this project's files record all; the reference
    code's .pth files determine layout, variant, prompt length, start layer and form by themselves)."""
    g = parser.add_argument_group("adapter settings (only where the adapter file leaves them open)")
    g.add_argument("--kv-layout", choices=("heads", "paper"), default=None,
                   help="how Whisper keys/values split into heads ('paper': the reference code's)")
    g.add_argument("--variant", choices=("L", "M", "S"), default=None, help="WL-L, WL-M or WL-S")
    g.add_argument("--prompt-length", dest="adapter_prompt_length", type=int, default=None, help="AiL prefix length")
    g.add_argument("--start-layer", dest="adapter_start_layer", type=int, default=None,
                   help="first block with adapters")
    g.add_argument("--hypotheses", choices=list(HYPOTHESIS_FORMS), default=None,
                   help="the n-best text form the adapter was trained on: " + "; ".join(
                       f"{k}: {v}" for k, v in HYPOTHESIS_FORMS.items()))


def read_results(path: Path) -> list:
    """The records of a --out file. A last line cut short (the process was killed inside a write) is dropped, and
    so are earlier failures (they are tried again); the file is rewritten atomically without them. A file with
    any other line that is not a record is not ours: it is refused, never rewritten."""
    if not path.exists():
        return []
    if path.is_dir():
        raise GenerateError(f"{path}: a folder; --out takes a .jsonl file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for n, line in enumerate(lines[:-1], 1):  # lines[-1]: what follows the last newline (b"" or a torn line)
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "file" not in record:
            raise GenerateError(f"{path}: line {n} is not a result of generate.py; give --out a new file")
        records.append(record)
    records = [r for r in records if "error" not in r]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if text != raw:
        write_atomic(path, text)
    return records


def write_line(stream, record: dict):
    """One JSON line in one write, then flushed: an interrupted run leaves whole lines only."""
    stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    stream.flush()


def load_audio_models(args):
    """(hypothesis Whisper, its tokenizer, feature Whisper, Whispering-LLaMA or None, LLM tokenizer or None) for
    --audio: the adapter of --adapter (default: the latest run's best) names the feature model it was trained on."""
    adapter = args.adapter or default_adapter()
    meta = read_adapter_meta(adapter) if adapter and Path(adapter).suffix == ".safetensors" else {}
    hyp_model, hyp_tok = convert_checkpoint.load_whisper(args.whisper, device=args.device)
    feature_name = args.feature_whisper or meta.get("whisper") or args.whisper
    feat_model = hyp_model if feature_name == args.whisper else \
        convert_checkpoint.load_whisper(feature_name, device=args.device)[0]
    if adapter is None:
        print("notice: no trained adapter found (train one with train.py, or pass --adapter); "
              "printing the Whisper 1-best, not a correction", file=sys.stderr)
        return hyp_model, hyp_tok, feat_model, None, None
    wl, tokenizer = load_wl(adapter, llm=args.llm, whisper=feat_model, device=args.device,
                            dtype=audio_dtype(args.dtype, args.device), **adapter_requests(args))
    return hyp_model, hyp_tok, feat_model, wl, tokenizer


def run_audio(args) -> int:
    """--audio: Whisper n-best → Whispering-LLaMA correction, for every file. A file that fails gets a one-line
    error (and an error record with --json / --out) and the others still run. Returns how many failed."""
    items = audio_inputs(args.audio)
    if args.explain and len(items) > 1:  # e.g. a manifest
        raise GenerateError(f"--explain writes one figure and {args.audio[0]} holds {len(items)} files: "
                            "use --explain-dir")
    todo = not_done(items, args.out)
    sink = open(args.out, "a", encoding="utf-8") if args.out is not None else None
    try:
        wl = tokenizer = hyp_model = hyp_tok = feat_model = None
        if any(not isinstance(i, tuple) for i in todo):  # models only when there is audio to read
            hyp_model, hyp_tok, feat_model, wl, tokenizer = load_audio_models(args)
            if wl is None and (args.explain or args.explain_dir):
                print("notice: no adapter, so no correction to explain (--explain)", file=sys.stderr)
        n_failed = 0
        for item in tqdm(todo, desc="correcting", unit="file", disable=len(todo) < 2):
            if isinstance(item, tuple):  # a folder without audio, a manifest that cannot be read
                report_failure(*item, args, sink)
                n_failed += 1
                continue
            path = item
            try:
                r = transcribe_and_correct(path, hyp_model, hyp_tok, feat_model, wl, tokenizer, args)
                if wl is not None and (args.explain or args.explain_dir):  # a second, explicit pass (explain.py)
                    png = args.explain or explain_path(args.explain_dir, path, items)
                    explain_file(path, r, wl, tokenizer, feat_model, png, args.max_new_tokens, args.explain_layer,
                                 args.decode)
            except (wm.AudioError, GenerateError, explain.ExplainError) as e:  # this file only: report, go on
                report_failure(path, str(e).removeprefix(f"{path}: "), args, sink)
                n_failed += 1
                continue
            if sink is not None:
                write_line(sink, r)
            report_result(r, path, len(items), args)
        return n_failed
    finally:
        if sink is not None:
            sink.close()


def not_done(items: list, out: Optional[Path]) -> list:
    """The items still to do: with --out, the files whose records are already in it are skipped (a rerun resumes);
    the arguments that give no file stay, to be reported again."""
    done = {r["file"] for r in read_results(out)} if out is not None else set()
    todo = [i for i in items if isinstance(i, tuple) or str(i) not in done]
    if done and len(todo) < len(items):
        print(f"{out}: resuming, {len(items) - len(todo)} of {len(items)} files already done", file=sys.stderr)
    return todo


def report_failure(name, problem: str, args, sink):
    """A file that failed: its `error:` line on stderr, and its error record on stdout (--json) and in --out."""
    tqdm.write(f"error: {name}: {problem}", file=sys.stderr)
    record = {"file": str(name), "error": problem}
    if args.json:
        write_line(sys.stdout, record)
    if sink is not None:
        write_line(sink, record)


def report_result(r: dict, path, n_items: int, args):
    """A corrected file on stdout: its record (--json), the n-best and both transcripts (--verbose), or the corrected
    transcript alone (after the file's path when there are several files)."""
    text = r["corrected"] if r["corrected"] is not None else r["one_best"]
    if args.json:
        write_line(sys.stdout, r)
    elif args.verbose:
        lines = [f"== {path}"] + [f"  {h['logprob']:9.3f}  {h['text']}" for w in r["nbest"] for h in w]
        tqdm.write("\n".join(lines + [f"1-best:    {r['one_best']}", f"corrected: {text}"]), file=sys.stdout)
    else:
        tqdm.write(f"{path}\t{text}" if n_items > 1 else text, file=sys.stdout)


def explain_path(folder: Path, path: Path, items: list) -> Path:
    """--explain-dir: <folder>/<file name>.png, or with its parent folders' names when two inputs share a name."""
    names = [Path(i).stem for i in items if not isinstance(i, tuple)]
    stem = path.stem if names.count(path.stem) < 2 else "_".join(path.with_suffix("").parts[-3:])
    return Path(folder) / f"{stem}.png"


def explain_correction(model, tokenizer, hypotheses, audio_features, max_new_tokens: int = 150, audio_frames=None,
                       layer=None, decode: str = "greedy") -> dict:
    """Correct one utterance exactly as correct() does, then explain that correction (explain.explain: its dict of
    plain numbers, the content of the JSON file). layer: draw this adapter layer instead of their average."""
    response = decode_correction(model, tokenizer, hypotheses, audio_features, max_new_tokens, audio_frames, decode)
    return explain.explain(model, tokenizer, hypotheses, response, audio_features, audio_frames, layer)


def explain_file(path, result: dict, wl, tokenizer, feat_model, png, max_new_tokens=150, layer=None,
                 decode="greedy") -> list:
    """--explain: look inside the correction run_audio made of one file (`result`, its record): the n-best lists
    are reused, the audio features recomputed (the encoder is deterministic), each 30 s window explained. Writes
    png (the first window; later windows as <stem>-window<k>.png) and the JSON beside each. Returns the PNG paths."""
    audio = wm.load_audio(path)
    written = []
    for w, (piece, nbest) in enumerate(zip(windows(audio), result["nbest"])):
        hyps = [h["text"] for h in nbest]
        if not hyps:
            continue  # silence: generate.py kept the 1-best, there is no correction to look inside
        mel = wm.log_mel_spectrogram(piece, feat_model.dims.n_mels)
        with torch.inference_mode():
            feats = feat_model.embed_audio(mel[None])[0]
        frames = wm.encoder_frames(len(piece))
        expl = explain_correction(wl, tokenizer, hyps, feats, max_new_tokens, frames, layer, decode)
        expl.update(file=str(path), window=w, window_start_seconds=wm.CHUNK_LENGTH * w,
                    clip_seconds=len(piece) / wm.SAMPLE_RATE)
        out = Path(png) if w == 0 else Path(png).with_name(f"{Path(png).stem}-window{w + 1}{Path(png).suffix}")
        try:
            explain.write(expl, out, mel.numpy(), title=f"{Path(path).name}: {expl['text']}")
        except OSError as e:
            raise GenerateError(f"cannot write {out}: {e.strerror or e}") from None
        written.append(out)
    return written


def run_text(args) -> str:
    """--prompt without audio: the plain LLM."""
    if not args.prompt.strip():
        raise GenerateError("the prompt is empty")
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_llm(args.checkpoint_dir, device=args.device, dtype=dtype)
    fmt = (args.chat_format or chat_format_for(model.config.name)) if args.chat else None
    text = chat_prompt(args.prompt, fmt, args.system) if fmt else args.prompt
    # add_bos: as the original tokenizer does (LLaMA: yes; SmolLM2: no, its "BOS" <|im_start|> opens turns).
    prompt_ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False).to(args.device)
    t0 = time.perf_counter()
    ids = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
                   eos_id=stop_ids(tokenizer, fmt))
    dt = time.perf_counter() - t0
    n_new = len(ids) - len(prompt_ids)
    print(f"{n_new} tokens in {dt:.2f} s ({n_new / dt:.1f} tokens/s)", file=sys.stderr)
    return continuation(tokenizer, prompt_ids, ids)


def build_parser() -> argparse.ArgumentParser:
    """generate.py's command line: what to correct or continue, the models, the output, decoding."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", nargs="+", default=None,
                        help="audio file(s), folder(s) or manifest(s) to transcribe and correct")
    parser.add_argument("--say", default=None, metavar="TEXT",
                        help="speak TEXT with eSpeak NG (the demo's held-out voice, mild noise) into out/say/ and "
                             "correct that: a real clip to try with no audio file at hand")
    parser.add_argument("--prompt", default=None, help="without --audio: text for the plain LLM to continue "
                                                       "(or, with --chat, the user's message)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="trained adapter (.safetensors from train.py); default: the best checkpoint of "
                             "the latest run under out/")
    parser.add_argument("--llm", type=Path, default=None,
                        help="LLM checkpoint folder for --audio (default: the one the adapter was trained on)")
    parser.add_argument("--whisper", default="tiny.en",
                        help="hypothesis model: Whisper name or folder that produces the n-best (default tiny.en)")
    parser.add_argument("--feature-whisper", default=None,
                        help="feature model whose encoder output the adapter attends to (default: the one "
                             "the adapter was trained with, else --whisper)")
    parser.add_argument("--nbest", type=int, default=15, help="hypotheses in the prompt (paper: 15)")
    parser.add_argument("--decode", choices=sorted(DECODES), default="likeliest",
                        help="with --audio: " + "; ".join(f"{k}: {v}" for k, v in DECODES.items()) +
                             " (default likeliest: on the demo dev split it lowers the WER a little, and it keeps "
                             "a runaway or search-error output from replacing a likelier hypothesis)")
    parser.add_argument("--samples", type=int, default=200, help="Whisper samples drawn for the n-best (paper: 200)")
    parser.add_argument("--verbose", action="store_true", help="also print the n-best and the 1-best")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per file; a file that fails gives {\"file\": ..., \"error\": ...}")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --audio: also append each file's JSON object to this file as soon as it is done; "
                             "a rerun with the same --out skips the files already there and retries the failed "
                             "ones (resume after an interruption; use a new file for other settings)")
    add_explain_flags(parser)
    add_adapter_flags(parser)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="converted LLM checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--chat-format", choices=sorted(CHAT_FORMATS), default=None,
                        help="chat format to use with --chat (default: chosen from the model's name)")
    parser.add_argument("--system", default=None, help="system message for --chat (default: the format's own)")
    parser.add_argument("--max-new-tokens", type=int, default=150, help="most tokens to generate (default 150)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (the default) is greedy decoding")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=1234, help="random seed for sampling (default 1234)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="weights and activations dtype; auto (the default): with --audio bfloat16 where it is "
                             "faster (native bf16 CPU matmuls: 1.25× on jfk.flac here, same text; bf16 GPUs), "
                             "else float32; with --prompt float32")
    return parser


def add_explain_flags(parser):
    """--explain and its companions (explain.py draws the figure)."""
    g = parser.add_argument_group("looking inside a correction (explain.py)")
    g.add_argument("--explain", type=Path, default=None, metavar="PNG",
                   help="with one audio file: draw where each corrected token listened (AiW over the audio frames, "
                        "above the log-mel), what it read (its self-attention over the n-best lines) and the gates, "
                        "to PNG, and the same numbers to a .json beside it")
    g.add_argument("--explain-dir", type=Path, default=None, metavar="DIR",
                   help="as --explain, one <name>.png + .json per audio file in DIR")
    g.add_argument("--explain-layer", type=int, default=None, metavar="N",
                   help="draw adapter layer N only, instead of the average over the adapter layers")


def main(argv=None):
    parser = build_parser()
    args = check_args(parser, parser.parse_args(argv))
    torch.manual_seed(args.seed)
    try:
        if args.audio is not None:
            failed = run_audio(args)
            if failed:
                sys.exit(1)  # each failure has had its own line
        else:
            print(run_text(args))
    except (ProjectError, ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        resume = f"; rerun with --out {args.out} to continue" if args.out is not None else ""
        print(f"interrupted{resume}", file=sys.stderr)
        sys.exit(130)


def check_args(parser, args):
    """Refuse flag values and combinations that cannot work (argparse's usage error); --say becomes --audio."""
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.say is not None:
        if args.audio is not None or not args.say.strip():
            parser.error("--say takes a non-empty text, instead of --audio")
        args.audio = [str(say(args.say))]
    if (args.audio is None) == (args.prompt is None):
        parser.error("give --audio (correct a transcript) or --prompt (plain LLM), not both or neither")
    if args.out is not None and args.audio is None:
        parser.error("--out goes with --audio")
    if (args.explain or args.explain_dir or args.explain_layer is not None) and args.audio is None:
        parser.error("--explain, --explain-dir and --explain-layer go with --audio or --say")
    if args.explain and args.explain_dir:
        parser.error("give --explain (one file) or --explain-dir (many), not both")
    if args.explain and (len(args.audio) > 1 or Path(args.audio[0]).is_dir()):
        parser.error("--explain writes one figure: for several files use --explain-dir")
    return args


if __name__ == "__main__":
    main()
