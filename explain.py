"""Look inside a correction: where each corrected word listened, what it read, and how much the audio counted.

    python generate.py --audio x.wav --explain x.png          # x.png and x.json beside it
    python generate.py --audio clips/ --explain-dir why/      # one figure (and JSON) per file
    python generate.py --audio x.wav --explain x.png --explain-layer 12   # one adapter layer, not the average

The paper's stated limitation is that one cannot see how the two modalities interact token by token. This file
shows it for one utterance, with three panels:

  1. Listening: for every output token, its AiW attention over the audio frames, softmax(q'' K_padᵀ/√D), averaged
     over the Whisper heads (the H - Hw padding heads hold only the identity template: they carry no audio) and
     over the adapter layers, drawn above the clip's log-mel spectrogram on the same time axis (an encoder frame
     is 20 ms; with full 30 s features a line marks where the audio ends).
  2. Reading: for every output token, the share of its causal self-attention that goes to the instruction, to each
     n-best hypothesis line, to the "### Response:" cue and to the earlier output.
  3. Gates: gate_L and gate_W of every adapter layer, and each branch's share of the attention output for this clip:
     ‖proj(branch)‖ / Σ ‖proj(branches)‖ over self-attention, prefix (AiL) and audio (AiW), at the output tokens.

"Output token j" means the query that *produced* token j: the position before it (the prompt's last token for the
first word), so every row shows what the model looked at when it chose that word.

How: generate.py decodes as usual (generate.decode_correction: correct()'s own steps, untouched) and hands the
response to `explain`. ONE extra teacher-forced pass over prompt + response then recomputes every layer from the
literal formulas of DESIGN.md §2, using only the model's parameters and config (the padded (H, F, D) template is built
here, on purpose), and keeps the probabilities at the output rows. Nothing of this runs unless asked. The pass is
checked against the model: at every output row it picks the same next token as the model's own forward over the same
tokens (`matches_model` in the JSON; for a bf16 model, whose forward rounds where this float32 pass does not, a
near-tie may differ), and tests/test_explain.py asserts that every layer's output equals the real module's and that
the AiW probabilities equal tests/wl_reference.py's literal template.

Three things a reader of the listening panel should know:
  - kv_layout "paper" (the reference code's head split) reinterprets the (F, W) buffer as (Hw, F, Dw): key row f of
    Whisper head h then holds part of frame (h·F + f) // Hw, not frame f. The panel maps every key row back to the
    frame it carries, so the time axis stays true in both layouts.
  - The random ablations (--random-audio, --random-init) draw fresh noise at every forward: this pass explains its
    own draw, so there `matches_model` may be false.
  - The gates scale the branch outputs, not these probabilities: a layer whose gate_W is near 0 can attend
    sharply and still change nothing. The third panel says how much each layer's audio branch actually counted.
"""
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import apply_rope, build_rope_cache
from prepare_data import PROMPT_TEMPLATE, build_prompt, encode_prompt
from storage import ProjectError, write_atomic
from whisper_model import FRAMES_PER_SECOND

FRAME_SECONDS = 1 / FRAMES_PER_SECOND  # one Whisper encoder frame (20 ms): the stride-2 conv over 10 ms mel frames


class ExplainError(ProjectError):
    """A request explain cannot follow: an --explain-layer that is no adapter layer, a listening adapter without
    its audio features."""


# ----------------------------------------------------------------------------------------------------
# The explicit pass: every layer from the literal formulas, probabilities kept at the output rows
# ----------------------------------------------------------------------------------------------------

def rms(x, weight=None, eps=1e-5):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.to(y.dtype) if weight is not None else y


def softmax_scores(q, k, causal=False):
    """softmax(q kᵀ / √D) as explicit probabilities. q (H, T, D), k (H, S, D) → (H, T, S)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=s.device).triu(S - T + 1), float("-inf"))
    return s.softmax(-1)


def padded_template(x_hat, H, D, identity=True):
    """K_pad (or V_pad) (H, F, D): every head the F×D matrix with ones on its principal diagonal, the top-left
    [:Hw, :, :Dw] block overwritten with x̂ (Hw, F, Dw). identity=False: the no-special-initialisation ablation's
    template, standard normal noise (one F×D draw repeated over the heads), as adapter.py draws it."""
    Hw, F_, Dw = x_hat.shape
    if identity:
        pad = torch.eye(F_, D, dtype=x_hat.dtype, device=x_hat.device).repeat(H, 1, 1)
    else:
        pad = torch.randn(1, F_, D, device=x_hat.device).to(x_hat.dtype).repeat(H, 1, 1)
    pad[:Hw, :, :Dw] = x_hat
    return pad


def whisper_heads(x, Hw, layout):
    """(F, W) → (Hw, F, Dw): `heads` splits the width; `paper` reinterprets the contiguous buffer."""
    F_, W = x.shape
    if layout == "paper":
        return x.contiguous().view(Hw, F_, W // Hw)
    return x.view(F_, Hw, W // Hw).transpose(0, 1)


def frame_of_key_row(F_, Hw, layout, device=None):
    """(Hw, F) long: the audio frame whose numbers key row f of Whisper head h holds. `heads`: frame f. `paper`:
    row (h, f) is elements [(h·F + f)·Dw, (h·F + f + 1)·Dw) of the flat (F, W) buffer, i.e. frame (h·F + f) // Hw."""
    rows = torch.arange(Hw * F_, device=device).view(Hw, F_)
    return rows // Hw if layout == "paper" else rows % F_


def audio_keys_values(attn, audio, c, W=lambda t: t):
    """k̂, v̂ (Hw, F, Dw) of one adapter layer from audio features (F, W), DESIGN.md §2 step 3, from the parameters
    (each read through W, e.g. an upcast)."""
    down_v, up_v = ("adapter_down_k", "adapter_up_k") if c.shared_down_up else ("adapter_down_v", "adapter_up_v")
    lin = lambda x, name: x @ W(getattr(attn, name).weight).T  # noqa: E731
    k = lin(audio, "whisper_key")
    v = lin(audio, "whisper_value") + W(attn.whisper_value.bias)
    k = lin(F.silu(lin(rms(k, W(attn.adapter_norm_k.weight), c.adapter_norm_eps), "adapter_down_k")), "adapter_up_k")
    v = lin(F.silu(lin(rms(v, W(attn.adapter_norm_v.weight), c.adapter_norm_eps), down_v)), up_v)
    return whisper_heads(k, c.whisper_heads, c.kv_layout), whisper_heads(v, c.whisper_heads, c.kv_layout)


def split_heads(t, n, D):
    """(T', n·D) → (n, T', D)."""
    return t.view(-1, n, D).transpose(0, 1)


def merge_heads(y):
    """(H, T', D) → (T', H·D)."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


def heard_audio(c, audio, audio_frames, dtype):
    """The features the adapter layers attend to, as WhisperingLLaMA.forward passes them on."""
    if c.trim_audio and audio_frames is not None:  # only the frames with audio
        audio = audio[: max(1, int(audio_frames))]
    if c.random_audio:  # the ablation: the model hears fresh noise, so this pass explains one such draw
        audio = torch.randn(audio.shape, device=audio.device, dtype=dtype)
    return audio


def prefix_branch(attn, q, c, W):
    """AiL: the queries q (H, T, D) over the layer's learned prefix → (probabilities (H, T, L), gate_L · output)."""
    H, G, D = c.n_head, c.n_query_groups, c.head_size
    rep = H // G
    p = W(attn.adapter_prefix.weight)
    if c.use_whisper:  # the WL variants normalise the prefix (no trained scale); text-only does not
        p = rms(p, None, c.adapter_norm_eps)
    _, k_p, v_p = (p @ W(attn.qkv.weight).T).split((H * D, G * D, G * D), dim=-1)
    k_p, v_p = split_heads(k_p, G, D).repeat_interleave(rep, 0), split_heads(v_p, G, D).repeat_interleave(rep, 0)
    p_prefix = softmax_scores(q, k_p)  # (H, T, L), no mask, no RoPE on the prefix
    return p_prefix, W(attn.adapter_gate_prefix) * (p_prefix @ v_p)


def audio_branch(attn, q, audio, c, W):
    """AiW: the mixed queries q'' over the padded template of the layer's audio keys/values → (probabilities
    (H, T, F), gate_W · output)."""
    H, D = c.n_head, c.head_size
    k_hat, v_hat = audio_keys_values(attn, audio, c, W)
    K = padded_template(k_hat, H, D, c.identity_init)
    V = padded_template(v_hat, H, D, c.identity_init)
    q1 = q @ W(attn.adapter_q_dim)  # q' = q Q_d, then q''[h] = Σ_h' q'[h'] Q_h[h', h]
    q2 = torch.einsum("itd,ih->htd", q1, W(attn.adapter_q_head))
    p_audio = softmax_scores(q2, K)  # (H, T, F), no mask
    return p_audio, W(attn.adapter_gate_whisper) * (p_audio @ V)


def literal_block(block, x, c, cos, sin, audio, adapted, W):
    """One transformer block over x (T, C) from the literal formulas → (its output (T, C), the attention
    probabilities {"self"; in an adapter block also "prefix" and, when it listens, "audio"}, each branch's output
    after the projection (T, C): its share of the residual)."""
    attn = block.attn
    H, G, D = c.n_head, c.n_query_groups, c.head_size
    h = rms(x, W(block.norm_1.weight), c.norm_eps)
    q, k, v = (h @ W(attn.qkv.weight).T).split((H * D, G * D, G * D), dim=-1)
    q, k, v = split_heads(q, H, D), split_heads(k, G, D), split_heads(v, G, D)
    q, k = apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]
    rep = H // G  # query head h reads key/value group h // rep
    probs = {"self": softmax_scores(q, k.repeat_interleave(rep, 0), causal=True)}  # (H, T, T)
    branches = [probs["self"] @ v.repeat_interleave(rep, 0)]
    if adapted:
        probs["prefix"], y = prefix_branch(attn, q, c, W)
        branches.append(y)
        if c.use_whisper:
            probs["audio"], y = audio_branch(attn, q, audio, c, W)
            branches.append(y)
    projected = [merge_heads(y) @ W(attn.proj.weight).T for y in branches]
    x = x + sum(projected)
    m = rms(x, W(block.norm_2.weight), c.norm_eps)
    mlp = block.mlp
    x = x + (F.silu(m @ W(mlp.fc_1.weight).T) * (m @ W(mlp.fc_2.weight).T)) @ W(mlp.proj.weight).T
    return x, probs, projected


@torch.no_grad()
def literal_pass(model, ids, audio=None, audio_frames=None, rows=None, keep_hidden=False):
    """One teacher-forced forward of a WhisperingLLaMA over ids (T,) from the literal formulas, in float32 (or
    float64 for a float64 model), depending only on the model's parameters and config.

    audio: encoder features (F, W) (None for a text-only adapter); audio_frames: frames that carry the clip (used
    as the model uses them: with config.trim_audio). rows: query positions whose probabilities are kept (default
    all). Returns a dict of tensors, one entry per adapter layer in the lists:
      logits (T, V); layers: the adapter blocks' indices;
      self (H, R, T): causal self-attention probabilities;  prefix (H, R, L): AiL probabilities;
      audio (Hw, R, F): AiW probabilities of the Whisper heads (key rows as the layout orders them; see
      frame_of_key_row);  norms (R, 3): ‖proj(·)‖ of the self, prefix and audio branches at each kept row;
      gate_prefix, gate_audio: the gates;  hidden: every block's output (1, T, C) when keep_hidden."""
    c = model.config
    dtype = torch.promote_types(model.lm_head.weight.dtype, torch.float32)
    W = lambda t: t.to(dtype)  # noqa: E731 (every parameter is read through this: bf16 weights are upcast)
    T = ids.shape[0]
    rows = torch.arange(T) if rows is None else torch.as_tensor(rows)
    cos, sin = build_rope_cache(T, c.head_size, c.rope_base, c.rope_scaling, device=ids.device)
    if audio is not None and c.use_whisper:
        audio = heard_audio(c, W(audio), audio_frames, dtype)
    out = {k: [] for k in ("layers", "self", "prefix", "audio", "norms", "gate_prefix", "gate_audio", "hidden")}
    x = W(model.transformer.wte.weight)[ids]  # (T, C)
    for i, block in enumerate(model.transformer.h):
        adapted = i >= c.adapter_start_layer
        x, probs, projected = literal_block(block, x, c, cos, sin, audio, adapted, W)
        if keep_hidden:
            out["hidden"].append(x[None].clone())
        if not adapted:
            continue
        out["layers"].append(i)
        out["self"].append(probs["self"][:, rows])
        out["prefix"].append(probs["prefix"][:, rows])
        out["gate_prefix"].append(float(block.attn.adapter_gate_prefix))
        norms = [y[rows].norm(dim=-1) for y in projected]  # a text-only layer's audio branch: 0
        norms += [torch.zeros(len(rows), dtype=dtype)] * (3 - len(projected))
        out["norms"].append(torch.stack(norms, dim=-1))
        if c.use_whisper:
            out["audio"].append(probs["audio"][: c.whisper_heads, rows])
            out["gate_audio"].append(float(block.attn.adapter_gate_whisper))
    out["logits"] = rms(x, W(model.transformer.ln_f.weight), c.norm_eps) @ W(model.lm_head.weight).T
    return out


# ----------------------------------------------------------------------------------------------------
# The prompt's parts: which token positions are the instruction, each hypothesis, the response cue
# ----------------------------------------------------------------------------------------------------

def prompt_segments(tokenizer, hypotheses, prompt_ids) -> list:
    """[(name, start, end)] token spans of the prompt as generate.correct builds it: "BOS" (position 0, where many
    heads put the attention they do not need elsewhere), "instruction" (the Alpaca header up to "### Input:"),
    "hyp 1" ... "hyp n" (each line with its newline), "response cue" (the blank line and "### Response:"). A boundary
    is the length of the token ids of the prompt text up to it, encoded the same way (BOS, ordinary text), which must
    be a prefix of the whole prompt's ids; were a token ever to straddle a boundary it is counted in the later part."""
    prompt = build_prompt(hypotheses)
    head = PROMPT_TEMPLATE[: PROMPT_TEMPLATE.index("{input}")]
    assert prompt.startswith(head)
    starts, pos = [], len(head)
    for h in hypotheses:  # build_prompt joins the stripped lines with "\n"
        starts.append(pos)
        pos += len(h.strip()) + 1
    cuts = starts + [pos - 1]  # the last boundary: the end of the last hypothesis' text
    ids = prompt_ids.tolist()
    bounds = []
    for cut in cuts:
        enc = tokenizer.encode(prompt[:cut], bos=True, eos=False, special=False).tolist()
        n = 0
        while n < min(len(enc), len(ids)) and enc[n] == ids[n]:
            n += 1
        bounds.append(n)
    names = ["BOS", "instruction"] + [f"hyp {i + 1}" for i in range(len(hypotheses))] + ["response cue"]
    edges = [0, 1] + bounds + [len(ids)]  # BOS on its own: most heads park most of their attention on it
    return [(name, a, b) for name, a, b in zip(names, edges[:-1], edges[1:])]


def reading_shares(p_self, segments, n_prompt, rows):
    """p_self (R, T) averaged over heads → (R, n_segments + 1): the share of each prompt part and of the earlier
    output ("earlier output": positions n_prompt .. row). Rows sum to 1 (causal: a row sees only ≤ its position)."""
    cols = [p_self[:, a:b].sum(-1) for _, a, b in segments]
    cols.append(p_self[:, n_prompt:].sum(-1))
    return torch.stack(cols, dim=-1)


def listening(p_audio, layout):
    """p_audio (Hw, R, F) of one layer → (R, F): mass on each real audio frame (key rows mapped back to frames),
    averaged over the Whisper heads. Rows sum to the Whisper heads' total probability on keys: 1."""
    Hw, R, F_ = p_audio.shape
    frame = frame_of_key_row(F_, Hw, layout, p_audio.device)  # (Hw, F)
    out = torch.zeros(R, F_, dtype=p_audio.dtype, device=p_audio.device)
    for h in range(Hw):
        out.index_add_(1, frame[h], p_audio[h])
    return out / Hw


# ----------------------------------------------------------------------------------------------------
# One utterance's correction: the explicit pass over it, then the numbers that the figure draws
# ----------------------------------------------------------------------------------------------------

def explain(model, tokenizer, hypotheses, correction, audio_features=None, audio_frames=None, layer=None) -> dict:
    """Explain one correction: `correction` is a generate.Correction (text, greedy_text, decode, token_ids,
    ended_with_eos) that generate.decode_correction made from these hypotheses and audio features; its tokens are
    read by the model one by one, EOS after them where decoding stopped on it (when --decode likeliest picked an
    n-best hypothesis, that hypothesis is the response read, as the greedy output would be).

    audio_features (F, W) or (1, F, W); audio_frames: frames that carry the clip (ceil(seconds · 50)). layer: draw
    one adapter layer (its index in the LLM) instead of the average over the adapter layers. Returns a dict of plain
    numbers (lists), the content of the JSON file; `draw` makes the figure from it."""
    c = model.config
    device = next(model.parameters()).device
    prompt_ids = encode_prompt(tokenizer, hypotheses).to(device)
    audio = None
    if c.use_whisper:
        if audio_features is None:
            raise ExplainError("this adapter listens: pass the audio features")
        audio = (audio_features[0] if audio_features.dim() == 3 else audio_features).to(device)
    P = len(prompt_ids)
    new = correction.token_ids.to(device)
    out_tokens = new.tolist() + ([tokenizer.eos_id] if correction.ended_with_eos else [])
    rows = torch.arange(P - 1, P - 1 + len(out_tokens))  # the query that produced each output token
    cap, matches = checked_pass(model, torch.cat([prompt_ids, new]), audio, audio_frames, rows)
    layers = cap["layers"]
    if layer is not None and layer not in layers:
        raise ExplainError(f"--explain-layer {layer}: not an adapter layer (those are {layers[0]}..{layers[-1]})")
    pick = [layers.index(layer)] if layer is not None else list(range(len(layers)))
    segments = prompt_segments(tokenizer, hypotheses, prompt_ids)
    return dict(
        text=correction.text, greedy_text=correction.greedy_text, decode=correction.decode,
        hypotheses=list(hypotheses), tokens=[tokenizer.decode([t]) for t in out_tokens], token_ids=out_tokens,
        ended_with_eos=correction.ended_with_eos,
        matches_model=matches,
        layers=layers, layer=layer, kv_layout=c.kv_layout if c.use_whisper else None,
        reading=reading_numbers(cap, segments, P, len(new), rows, pick),
        gates=dict(gate_L=cap["gate_prefix"], gate_W=cap["gate_audio"] or None),
        branch_share=branch_shares(cap),
        prefix_attention=torch.stack([p.mean(0) for p in cap["prefix"]])[pick].mean(0).tolist(),
        listening=listening_numbers(cap, c.kv_layout, audio_frames, pick) if c.use_whisper else None,
    )


def checked_pass(model, ids, audio, audio_frames, rows):
    """The explicit pass over prompt + response ids, and whether, at every output row, it picks the same next token
    as the model's own forward over the same tokens."""
    cap = literal_pass(model, ids, audio, audio_frames, rows)
    with torch.inference_mode():
        own = model(ids[None], audio=None if audio is None else audio[None], audio_frames=audio_frames)[0]
    return cap, cap["logits"][rows].argmax(-1).tolist() == own[rows].argmax(-1).tolist()


def reading_numbers(cap, segments, n_prompt, n_new, rows, pick) -> dict:
    """Panel 2: each output row's share of self-attention per prompt part and the earlier output, for every adapter
    layer (per_layer) and averaged over the picked ones (drawn)."""
    reading = torch.stack([reading_shares(s.mean(0), segments, n_prompt, rows) for s in cap["self"]])  # (layers, R, S)
    return dict(parts=[s[0] for s in segments] + ["earlier output"],
                spans=[[a, b] for _, a, b in segments] + [[n_prompt, n_prompt + n_new]],
                drawn=reading[pick].mean(0).tolist(), per_layer=reading.tolist())


def branch_shares(cap) -> dict:
    """Panel 3: each branch's share of ‖attention output‖ per adapter layer, averaged over the output rows."""
    norms = torch.stack(cap["norms"])  # (layers, R, 3)
    shares = (norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)).mean(1)  # (layers, 3)
    return dict(branches=["self-attention", "prefix (AiL)", "audio (AiW)"], per_layer=shares.tolist())


def listening_numbers(cap, layout, clip, pick) -> dict:
    """Panel 1: each output row's attention over the audio frames, averaged over the picked adapter layers, and the
    part of it that lies after the clip's end (clip: the frames with audio) when the features go on past it."""
    lis = torch.stack([listening(p, layout) for p in cap["audio"]])  # (layers, R, F)
    n_frames = lis.shape[-1]
    drawn = lis[pick].mean(0)
    return dict(frames=n_frames, frame_seconds=FRAME_SECONDS, clip_frames=clip, drawn=drawn.tolist(),
                after_clip=drawn[:, clip:].sum(-1).tolist() if clip is not None and clip < n_frames else None)


# ----------------------------------------------------------------------------------------------------
# The figure and the JSON
# ----------------------------------------------------------------------------------------------------

def token_label(text: str) -> str:
    return repr(text) if not text.strip() else text.strip()


def draw(expl: dict, path, mel=None, title=""):
    """The three panels of `expl` (from `explain`) as a PNG at `path`, written atomically. mel: the clip's log-mel
    (n_mels, 3000) as whisper_model.log_mel_spectrogram computes it (10 ms columns)."""
    import matplotlib  # here, not at the top: generate.py imports this file and starts without it (~0.3 s)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [token_label(t) for t in expl["tokens"]]
    if expl["ended_with_eos"]:
        labels[-1] = "<end>"
    which = f"layer {expl['layer']}" if expl["layer"] is not None else \
        f"mean of layers {expl['layers'][0]}-{expl['layers'][-1]}"
    row_h = max(2.5, 0.22 * len(labels) + 1)
    fig = plt.figure(figsize=(16, row_h + 2.2 + 3.2))
    gs = fig.add_gridspec(3, 2, width_ratios=[3, 1.3], height_ratios=[row_h, 2.2, 3.2], hspace=0.45, wspace=0.25)
    ax_lis, ax_read = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    ax_mel = fig.add_subplot(gs[1, 0], sharex=ax_lis)
    ax_gate, ax_share = fig.add_subplot(gs[2, 0]), fig.add_subplot(gs[2, 1])
    draw_listening(ax_lis, ax_mel, expl["listening"], labels, which, mel)
    draw_hypotheses(fig.add_subplot(gs[1, 1]), expl["hypotheses"])
    draw_reading(ax_read, expl["reading"], labels, which)
    draw_gates(ax_gate, expl["layers"], expl["gates"])
    draw_branch_shares(ax_share, expl["layers"], expl["branch_share"])
    fig.suptitle(title or f"corrected: {expl['text']}", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def draw_listening(ax_lis, ax_mel, lis, labels, which, mel):
    """Panel 1: where each output token listened, above the log-mel on the same seconds axis."""
    from matplotlib.colors import TwoSlopeNorm  # matplotlib only when drawing, as in draw

    if lis is None:
        ax_lis.text(0.5, 0.5, "text-only adapter: no audio branch (AiW), nothing listened to", ha="center",
                    va="center", transform=ax_lis.transAxes, fontsize=12)
        ax_lis.set_xticks([])
        ax_lis.set_yticks([])
        ax_mel.set_visible(False)
        return
    R = len(labels)
    a = np.array(lis["drawn"]) * lis["frames"]  # against uniform attention: 1 = every frame alike
    seconds = lis["frames"] * lis["frame_seconds"]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(a.min(), 0.99), vmax=max(a.max(), 1.01))
    im = ax_lis.imshow(a, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest",
                       extent=(0, seconds, R - 0.5, -0.5))
    ax_lis.set_yticks(range(R), labels, fontsize=8)
    ax_lis.set_title(f"Listening: AiW attention over the audio frames, Whisper heads averaged, {which}", fontsize=10)
    ax_lis.figure.colorbar(im, ax=ax_lis, fraction=0.02, pad=0.01).set_label("× uniform (1 = all frames alike)",
                                                                             fontsize=8)
    if mel is not None:
        m = np.asarray(mel)[:, : int(round(seconds / 0.01))]
        ax_mel.imshow(m, aspect="auto", origin="lower", cmap="viridis", extent=(0, seconds, 0, m.shape[0]))
        ax_mel.set_ylabel("mel bin")
    ax_mel.set_xlabel("seconds (one encoder frame = 20 ms)")
    ax_mel.set_title("log-mel spectrogram (Whisper's input)", fontsize=10)
    clip = lis["clip_frames"]
    if clip is not None and clip < lis["frames"]:
        end = clip * lis["frame_seconds"]
        for ax in (ax_lis, ax_mel):
            ax.axvline(end, color="cyan", lw=1.2, ls="--")
        after = np.mean(lis["after_clip"]) if lis["after_clip"] else 0.0
        ax_mel.text(end, ax_mel.get_ylim()[1], f" audio ends ({end:.2f} s); {100 * after:.0f}% of the "
                    "attention lies after it", color="cyan", va="top", fontsize=8)
    ax_lis.set_xlim(0, seconds)


def draw_hypotheses(ax, hypotheses):
    """The n-best lines, so that the reading panel's columns can be read."""
    ax.axis("off")
    lines = [f"hyp {i + 1}: {h[:70]}" for i, h in enumerate(hypotheses)]
    ax.text(0, 1, "\n".join(lines), va="top", fontsize=6, family="monospace", transform=ax.transAxes)


def draw_reading(ax, read, labels, which):
    """Panel 2: where each output token's self-attention went."""
    from matplotlib.colors import PowerNorm  # matplotlib only when drawing, as in draw

    r = np.array(read["drawn"])
    ax.imshow(r, aspect="auto", cmap="Blues", norm=PowerNorm(0.5, 0, max(r.max(), 1e-9)),
              interpolation="nearest")  # square-root colours: a 2% hypothesis line still shows
    ax.set_xticks(range(len(read["parts"])), read["parts"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(f"Reading: share of self-attention ({which})", fontsize=10)
    for (i, j), v in np.ndenumerate(r):
        if v >= 0.05:
            ax.text(j, i, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.4 * r.max() else "black")


def draw_gates(ax, layers, gates):
    """Panel 3, left: gate_L and gate_W of every adapter layer."""
    x = np.arange(len(layers))
    gL, gW = gates["gate_L"], gates["gate_W"]
    ax.bar(x - 0.2, gL, 0.4, label=f"gate_L (prefix, AiL; largest |gate_L| {max(map(abs, gL)):.3g})")
    if gW is not None:
        ax.bar(x + 0.2, gW, 0.4, label=f"gate_W (audio, AiW; {min(gW):.3g} to {max(gW):.3g})")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, layers, fontsize=7)
    ax.set(xlabel="adapter layer", title="gates per adapter layer")
    ax.legend(fontsize=8)


def draw_branch_shares(ax, layers, branch_share):
    """Panel 3, right: how much each branch counted for this clip, per adapter layer."""
    x = np.arange(len(layers))
    share = np.array(branch_share["per_layer"])
    bottom = np.zeros(len(layers))
    for k, name in enumerate(branch_share["branches"]):
        ax.bar(x, share[:, k], bottom=bottom, label=name, color=["#bbbbbb", "C0", "C1"][k])
        bottom += share[:, k]
    ax.set_xticks(x[:: max(1, len(x) // 10)], layers[:: max(1, len(x) // 10)], fontsize=7)
    ax.set(xlabel="adapter layer", ylim=(0, 1),
           title="share of ‖attention output‖ per branch\n(this clip, output tokens)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="lower right")


def write(expl: dict, png, mel=None, title=""):
    """png and the same numbers as JSON beside it (png with .json)."""
    png = Path(png)
    draw(expl, png, mel, title)
    write_atomic(png.with_suffix(".json"), json.dumps(rounded(expl), ensure_ascii=False).encode())


def rounded(x, digits=6):
    """Floats to `digits` significant digits (the JSON of a long clip stays small; float32 carries ~7)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x
