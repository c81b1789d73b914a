"""Score Whispering-LLaMA adapters on a prepared split: the WER / WERR / GTMR table of the paper's Table 2.

    python evaluate.py                                        # demo test split, latest training run's adapter
    python evaluate.py --adapter out/a/best.safetensors out/b/best.safetensors --limit 50
    python evaluate.py --data data/demo --split dev           # with no trained adapter: baseline rows only

Metrics (Radhakrishnan et al., EMNLP 2023, §4):
  - WER: corpus word error rate, total word errors (substitutions + deletions + insertions, from jiwer)
    over the total number of reference words; a percentage in the table.
  - WERR: relative WER reduction, (baseline - WER) / baseline × 100, against two baselines: the n-best
    oracle (the paper's WERR: per utterance the hypothesis with the fewest errors) and the Whisper 1-best.
  - GTMR: ground-truth match rate, the % of outputs exactly equal to the ground truth.
Each is reported three ways, since the references are written text (capitals, digits, punctuation):
  - raw: the strings as they are (stripped of surrounding whitespace, as the paper's code does);
  - light: the paper's normalisation, lowercase and remove . , - ? ' (prepare_data.normalize_text);
  - whisper: OpenAI Whisper's English text normaliser (spelled-out numbers to digits, British to American
    spelling, contractions expanded, symbols removed), from the `whisper-normalizer` package.
The oracle is chosen again under each normalisation: which hypothesis is closest depends on it.

Outputs: the Markdown table (printed and written to --out), and beside it a JSONL file with one line per
utterance: the reference, 1-best, oracle, every adapter's output and the per-utterance word errors.
"""
import argparse
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import generate  # its functions by module attribute: tests replace generate.correct and generate.load_llm
from generate import GenerateError, add_adapter_flags, adapter_requests
from prepare_data import PreparedDataset, normalize_text, utterance_seed, word_errors
from storage import ProjectError, first_line, write_atomic

ROOT = Path(__file__).resolve().parent
NORMALISATIONS = ("raw", "light", "whisper")
ONE_BEST, ORACLE = "1-best", "oracle"  # the two baseline rows


class EvalError(ProjectError):
    """Bad input to the evaluation: a missing data folder or adapter, an empty split, mismatched models."""


# ----------------------------------------------------------------------------------------------------
# Normalisations
# ----------------------------------------------------------------------------------------------------

def raw(text: str) -> str:
    """No normalisation beyond surrounding whitespace (the paper's code strips both sides too)."""
    return text.strip()


light_normalize = normalize_text  # the paper's: lowercase, remove . , - ? ' (one definition, in prepare_data)


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        raise EvalError("the whisper normalisation needs `pip install whisper-normalizer`") from None
    return EnglishTextNormalizer()  # reads its British→American spelling table once


def whisper_normalize(text: str) -> str:
    """OpenAI Whisper's EnglishTextNormalizer: "I'm going to the U.S. at 5 PM" → "i am going to the u s at 5 pm"."""
    return _english_normalizer()(text)


NORMALISERS = {"raw": raw, "light": light_normalize, "whisper": whisper_normalize}


# ----------------------------------------------------------------------------------------------------
# Metrics: small pure functions
# ----------------------------------------------------------------------------------------------------

def corpus_wer(references, hypotheses) -> float:
    """Corpus WER as a fraction: the total errors over the total reference words (not a mean of
    per-utterance rates, which would weigh a 3-word utterance like a 30-word one)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = [word_errors(r, h) for r, h in zip(references, hypotheses)]
    words = sum(n for _, n in counts)
    if words == 0:
        raise ValueError("the references have no words")
    return sum(e for e, _ in counts) / words


def werr(wer: float, baseline: float) -> Optional[float]:
    """Relative WER reduction in %, (baseline - wer) / baseline × 100; None when the baseline is 0
    (nothing to reduce). Negative when `wer` is worse than the baseline."""
    if baseline == 0:
        return None
    return (baseline - wer) / baseline * 100


def gtmr(references, outputs) -> float:
    """Ground-truth match rate in %: how many outputs equal their reference exactly."""
    if not references:
        raise ValueError("no utterances")
    return 100 * sum(r == o for r, o in zip(references, outputs, strict=True)) / len(references)


def oracle_index(reference: str, hypotheses) -> int:
    """The hypothesis with the fewest word errors against the reference (the first of equals: the n-best
    list is ordered by log-probability, best first)."""
    if not hypotheses:
        raise ValueError("no hypotheses to choose from")
    errors = [word_errors(reference, h)[0] for h in hypotheses]
    return errors.index(min(errors))


@dataclass
class Scores:
    """One row of the table under one normalisation. wer is a fraction; the others are percentages."""
    wer: float
    werr_oracle: Optional[float]
    werr_one_best: Optional[float]
    gtmr: float


def score(utterances, outputs=None) -> tuple:
    """All the metrics for a list of utterances and the outputs of each system.

    utterances: dicts with "text" (the ground truth), "hypotheses" (the n-best list) and "one_best";
    outputs: {system name: [one output per utterance]}.
    Returns (table, details): table[system][normalisation] = Scores, with the rows "1-best", "oracle" and one
    per system; details[i][normalisation] = {"words": reference words, "errors": {system: errors},
    "oracle": index of the oracle hypothesis (or None when the list is empty and the 1-best stands in)}."""
    outputs = outputs or {}
    if not utterances:
        raise ValueError("no utterances to score")
    for name, outs in outputs.items():
        if len(outs) != len(utterances):
            raise ValueError(f"{name}: {len(outs)} outputs for {len(utterances)} utterances")
    table = {name: {} for name in (ONE_BEST, ORACLE, *outputs)}
    details = [{} for _ in utterances]
    for norm_name, norm in NORMALISERS.items():
        refs = [norm(u["text"]) for u in utterances]
        systems = {ONE_BEST: [norm(u["one_best"]) for u in utterances], ORACLE: []}
        for i, (u, ref) in enumerate(zip(utterances, refs)):
            hyps = [norm(h) for h in u["hypotheses"]]
            # every hypothesis may have been the ground truth, removed from the list: the 1-best stands in
            j = oracle_index(ref, hyps) if hyps else None
            systems[ORACLE].append(hyps[j] if hyps else systems[ONE_BEST][i])
            details[i][norm_name] = {"oracle": j}
        systems.update({name: [norm(o) for o in outs] for name, outs in outputs.items()})
        counts = {name: [word_errors(r, h) for r, h in zip(refs, hyps)] for name, hyps in systems.items()}
        words = sum(n for _, n in counts[ONE_BEST])
        if words == 0:
            raise ValueError(f"the references have no words after the {norm_name} normalisation")
        wers = {name: sum(e for e, _ in c) / words for name, c in counts.items()}
        for name, hyps in systems.items():
            table[name][norm_name] = Scores(wers[name], werr(wers[name], wers[ORACLE]),
                                            werr(wers[name], wers[ONE_BEST]), gtmr(refs, hyps))
        for i, d in enumerate(details):
            d[norm_name].update(words=counts[ONE_BEST][i][1], errors={name: c[i][0] for name, c in counts.items()})
    return table, details


def best_system(table, names, by="raw") -> str:
    """The system among `names` with the lowest WER under normalisation `by` (ties: the first given)."""
    return min(names, key=lambda n: table[n][by].wer)


# ----------------------------------------------------------------------------------------------------
# Report: the Markdown table and the per-utterance JSONL
# ----------------------------------------------------------------------------------------------------

def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_table(table, title="", best=None, select="raw") -> str:
    """The paper's Table 2 in Markdown: a row per system, for each normalisation WER (%), WERR (%) against the
    oracle and against the 1-best, and GTMR (%)."""
    header = ["system"]
    for n in NORMALISATIONS:
        header += [f"{n} WER", f"{n} WERR vs oracle", f"{n} WERR vs 1-best", f"{n} GTMR"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, row in table.items():
        cells = [name.replace("|", "\\|")]
        for n in NORMALISATIONS:
            s = row[n]
            cells += [_pct(100 * s.wer), _pct(s.werr_oracle), _pct(s.werr_one_best), _pct(s.gtmr)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "All numbers in %. WERR = (baseline WER - WER) / baseline WER × 100; GTMR = outputs equal to the "
              "ground truth. raw: as written; light: lowercase, no . , - ? ' (the paper's); whisper: OpenAI "
              "Whisper's English text normaliser. The oracle is the n-best hypothesis closest to the ground truth, "
              "chosen under each normalisation."]
    if best is not None:
        lines += ["", f"Best adapter (lowest {select} WER): {best}"]
    return "\n".join(lines) + "\n"


def utterance_lines(utterances, outputs, details) -> list:
    """One JSON-able dict per utterance: texts, each system's word errors and WER under each normalisation."""
    lines = []
    for i, (u, d) in enumerate(zip(utterances, details)):
        j = d["raw"]["oracle"]
        line = {"id": u["id"], "reference": u["text"], "one_best": u["one_best"],
                "oracle": u["hypotheses"][j] if j is not None else u["one_best"],
                "outputs": {name: outs[i] for name, outs in outputs.items()}}
        for n in NORMALISATIONS:
            words, errors = d[n]["words"], d[n]["errors"]
            line[n] = {"oracle_index": d[n]["oracle"], "words": words, "errors": errors,
                       "wer": {name: (e / words if words else None) for name, e in errors.items()}}
        lines.append(line)
    return lines


def write_report(out: Path, markdown: str, lines) -> Path:
    """The table to `out` and the per-utterance lines to the .jsonl beside it. Returns the JSONL path."""
    jsonl = out.with_suffix(".jsonl")
    write_atomic(out, markdown)
    write_atomic(jsonl, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return jsonl


# ----------------------------------------------------------------------------------------------------
# Running the adapters
# ----------------------------------------------------------------------------------------------------

def load_split(data, split, limit=None) -> PreparedDataset:
    data = Path(data)
    if not data.is_dir():
        raise EvalError(f"data folder {data} not found: prepare it first (python prepare_data.py)")
    try:
        ds = PreparedDataset(data, split)
    except FileNotFoundError:
        raise EvalError(f"{data} has no prepared split {split!r} ({data / split / 'index.jsonl'} not found)") from None
    if limit is not None:
        ds.entries = ds.entries[:limit]
    if not ds.entries:
        raise EvalError(f"{data}/{split} holds no utterances")
    return ds


# ----------------------------------------------------------------------------------------------------
# Resuming: every output is appended to a cache file as soon as it is decoded
# ----------------------------------------------------------------------------------------------------


def cache_path(out: Path, adapter, ds: PreparedDataset, llm, whisper, max_new_tokens, requested,
               dtype="float32") -> Path:
    """Where the outputs of one adapter on one split are kept while a table is being made:
    <out folder>/.<table name>.partial/<hash of everything that decides them>.jsonl. A rerun of the same command
    finds the file and decodes only what is missing; another adapter file, data or setting gets another name."""
    import hashlib

    def stamp(p):  # a file changed in place (retrained adapter, re-derived index) must not reuse old outputs
        st = Path(p).stat()
        return [str(Path(p).resolve()), st.st_size, st.st_mtime_ns]

    whisper_key = str(whisper) if whisper is None or isinstance(whisper, (str, Path)) else f"model {id(whisper)}"
    key = json.dumps([stamp(adapter), stamp(ds.root / ds.split / "index.jsonl"), str(llm), whisper_key,
                      max_new_tokens, requested or {}, dtype], sort_keys=True, default=str)
    return out.parent / f".{out.stem}.partial" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".jsonl")


def read_cache(path: Optional[Path]) -> dict:
    """{utterance id: its record, {"id", "output" (greedy), maybe "likeliest"}} of a cache file; a line cut short
    by a kill is ignored."""
    done = {}
    if path is not None and path.exists():
        for line in path.read_bytes().split(b"\n"):
            try:
                record = json.loads(line)
                if "output" in record:
                    done[record["id"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return done


@torch.inference_mode()
def run_adapter(adapter, ds: PreparedDataset, llm=None, whisper=None, device="cpu", max_new_tokens=150,
                progress=True, requested=None, cache: Optional[Path] = None, likeliest=False, dtype="float32"):
    """The corrected transcript of every utterance of `ds` by one adapter checkpoint: greedy decoding, the
    response up to its first newline (generate.correct, as the paper). Returns {"greedy": outputs}, and with
    likeliest=True also "likeliest": generate.DECODES["likeliest"] outputs, chosen among the greedy ones and the
    n-best. llm / whisper override the LLM folder and the Whisper (name, folder or model) that the adapter file
    names; requested: generate.ADAPTER_FLAGS settings for what the file leaves open. The split must hold n-best
    lists in the adapter's form.
    cache: a JSONL file that receives each output as it is decoded and that a rerun takes them back from.
    dtype: the frozen weights' dtype (generate.py's --dtype; "auto" as there)."""
    adapter = Path(adapter)
    model, tokenizer = load_adapter_for(adapter, ds, llm, whisper, device, requested, dtype)
    done = read_cache(cache)
    sink = None  # opened with the first new output: a run that fails at once leaves no file behind
    outputs = {"greedy": [], **({"likeliest": []} if likeliest else {})}
    try:
        with tqdm(total=len(ds), desc=f"correcting ({adapter.name})", unit="utt", disable=not progress) as bar:
            for i, entry in enumerate(ds.entries):
                record = done.get(entry["id"], {})  # decoded by an interrupted earlier run of the same command
                if not record or (likeliest and "likeliest" not in record):
                    record = decode_utterance(model, tokenizer, ds, i, record, adapter, device, max_new_tokens,
                                              likeliest)
                    if cache is not None:  # one whole line per write: a kill leaves at most one torn line, ignored
                        if sink is None:
                            cache.parent.mkdir(parents=True, exist_ok=True)
                            sink = open(cache, "a", encoding="utf-8")
                        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                        sink.flush()
                for decode, outs in outputs.items():
                    outs.append(record["output" if decode == "greedy" else decode])
                bar.update(1)
    finally:
        if sink is not None:
            sink.close()
    return outputs


def load_adapter_for(adapter: Path, ds: PreparedDataset, llm, whisper, device, requested, dtype):
    """run_adapter's (model, tokenizer), refused with a one-line EvalError when the file cannot be loaded or was
    trained on another n-best form than the split holds."""
    if not adapter.is_file():
        raise EvalError(f"adapter checkpoint {adapter} not found")
    try:
        model, tokenizer = generate.load_wl(adapter, llm=llm, whisper=whisper, device=device,
                                            dtype=generate.audio_dtype(dtype, device), **(requested or {}))
    except (ProjectError, OSError, ValueError) as e:
        message = first_line(e)
        raise EvalError(message if str(adapter) in message else f"{adapter}: cannot load it: {message}") from None
    data_form = ds.meta.get("hypotheses", "logprob")
    if model.hypothesis_form != data_form:
        raise EvalError(f"{adapter} was trained on '{model.hypothesis_form}' n-best lists but {ds.root} holds "
                        f"'{data_form}' ones: re-derive them with python prepare_data.py --out {ds.root} "
                        f"--hypotheses {model.hypothesis_form}")
    return model, tokenizer


def decode_utterance(model, tokenizer, ds: PreparedDataset, i: int, record: dict, adapter, device, max_new_tokens,
                     likeliest: bool) -> dict:
    """The cache record of utterance i: {"id", "output": the greedy correction, "likeliest" (when asked)}. record:
    what an earlier run left of it (the greedy output without the likeliest choice), else {}."""
    c = model.config
    # the random-audio ablation draws noise: the same numbers for an utterance on every run, resumed or not
    torch.manual_seed(utterance_seed(0, ds.entries[i]["id"]))
    item = ds[i]
    features = item["audio_features"]  # (F, W) float16
    if c.use_whisper and features.shape[-1] != c.whisper_width:
        raise EvalError(f"{adapter} fuses Whisper features of width {c.whisper_width} but {ds.root} holds width "
                        f"{features.shape[-1]}: prepare the data with the adapter's feature model")
    meta = item["meta"]
    hyps, frames, features = meta["hypotheses"], meta.get("n_frames"), features.to(device)
    try:
        if not record:  # else only the likeliest choice is missing: the greedy output is cached
            record = {"id": meta["id"], "output": generate.correct(
                model, tokenizer, hyps, features, max_new_tokens, audio_frames=frames)}
        if likeliest:
            record["likeliest"] = generate.likeliest(model, tokenizer, hyps, features, record["output"], frames)
    except GenerateError as e:  # e.g. a prompt longer than the LLM's context
        raise EvalError(f"{meta['id']}: {e}") from None
    return record


# ----------------------------------------------------------------------------------------------------
# LLM n-best rescoring: selection instead of generation, with the same frozen LLM and no training
# ----------------------------------------------------------------------------------------------------

RESCORE_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)  # λ grid, tuned on dev


@torch.inference_mode()
def lm_logprobs(model, tokenizer, texts) -> list:
    """Total log-probability of each text under the plain LLM, as one sentence: P(text, EOS | BOS), the text
    encoded as ordinary characters. One padded batch; padding is never scored."""
    bos = tokenizer.bos_id is not None
    seqs = [tokenizer.encode(t, bos=bos, eos=True, special=False) for t in texts]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    param = next(model.parameters())
    logp = model(ids.to(param.device)).float().log_softmax(-1)[:, :-1]  # position t predicts token t + 1
    token_lp = logp.gather(-1, ids[:, 1:, None].to(param.device))[..., 0].cpu()  # (n, T-1)
    scored = torch.arange(ids.shape[1] - 1)[None] < (lengths - 1)[:, None]
    return (token_lp * scored).sum(1).tolist()


def lm_scores(model, tokenizer, utterances, progress=True) -> list:
    """[LM log-probability of each hypothesis] per utterance."""
    return [lm_logprobs(model, tokenizer, u["hypotheses"])
            for u in tqdm(utterances, desc="LM scores", unit="utt", disable=not progress)]


def rescore(utterances, scores, weight: float) -> list:
    """Per utterance the hypothesis with the highest LM log-prob + weight × Whisper's total log-prob (given
    lists have no Whisper log-prob: the LM alone decides there). Ties: the first (Whisper's best first)."""
    chosen = []
    for u, lm in zip(utterances, scores):
        whisper = u.get("logprobs") or [None] * len(lm)
        total = [s + weight * (w or 0.0) for s, w in zip(lm, whisper)]
        chosen.append(u["hypotheses"][total.index(max(total))])
    return chosen


def tune_rescoring(utterances, scores, weights=RESCORE_WEIGHTS) -> float:
    """The λ of `weights` with the lowest raw corpus WER on `utterances` (a dev split; ties: the smallest)."""
    refs = [u["text"] for u in utterances]
    return min(weights, key=lambda w: (corpus_wer(refs, rescore(utterances, scores, w)), w))


def rescoring_rows(data, split, ds, llm=None, device="cpu", tune_split="dev", progress=True) -> dict:
    """{row name: outputs} for LLM n-best rescoring on ds: the LM alone, and the LM interpolated with
    Whisper's log-prob with λ tuned on `tune_split` (never on the split being scored)."""
    if tune_split == split:
        raise EvalError(f"--tune-split {tune_split} is the split being scored: tune on another (dev)")
    model, tokenizer = generate.load_llm(llm, device=device)
    scores = lm_scores(model, tokenizer, ds.entries, progress)
    dev = load_split(data, tune_split)
    weight = tune_rescoring(dev.entries, lm_scores(model, tokenizer, dev.entries, progress))
    return {"LLM rescoring (LM only)": rescore(ds.entries, scores, 0.0),
            f"LLM rescoring (LM + {weight:g}·Whisper, λ tuned on {tune_split})": rescore(ds.entries, scores, weight)}


def default_adapters() -> list:
    """[the best checkpoint of the latest training run under out/, else the shipped demo adapter], or [] when
    there is neither: generate.py's default (generate.default_adapter), so that both scripts use one adapter."""
    latest = generate.default_adapter()
    if latest is None:
        return []
    try:
        return [latest.relative_to(Path.cwd())]  # shorter row names when run from the repository
    except ValueError:
        return [latest]


def evaluate(data, split="test", adapters=None, limit=None, out=None, llm=None, whisper=None, device="cpu",
             max_new_tokens=150, select="raw", progress=True, requested=None, rescoring=False,
             tune_split="dev", likeliest=False, dtype="float32") -> dict:
    """Run every adapter on the split and write the table and the per-utterance JSONL.
    adapters None: the best checkpoint of the latest training run in out/, if any (else baseline rows only).
    rescoring: add the LLM n-best rescoring rows (λ tuned on tune_split).
    likeliest: add a row per adapter with generate.DECODES["likeliest"] (named "<adapter> (likeliest)").
    dtype: the adapters' models' weights (float32, the default, as every table in the README; bfloat16 decodes ~2×
    faster on a CPU with bf16 matmuls; auto as generate.py); named in the table's title unless float32.
    Returns {"table", "best", "markdown", "out", "jsonl"}."""
    ds = load_split(data, split, limit)
    out = Path(out) if out is not None else ROOT / "out" / "eval" / f"{split}.md"
    if out.suffix == ".jsonl":
        raise EvalError(f"--out {out}: give the Markdown path (the .jsonl is written beside it)")
    if adapters is None:
        adapters = default_adapters()
        if not adapters:
            print("notice: no trained adapter in out/ (train one with python train.py): "
                  "showing the 1-best and oracle rows only", file=sys.stderr)
    names = []
    for a in adapters:  # the row name is the path as given; the same file twice is evaluated once
        if str(a) not in names:
            names.append(str(a))
    for a in names:
        if not Path(a).is_file():
            raise EvalError(f"adapter checkpoint {a} not found")
    utterances = ds.entries
    outputs = {}

    if rescoring:
        outputs.update(rescoring_rows(data, split, ds, llm, device, tune_split, progress))

    def report():
        table, details = score(utterances, outputs)
        ran = [a for a in outputs if a in names or a.removesuffix(" (likeliest)") in names]
        best = best_system(table, ran, select) if len(ran) > 1 else None
        title = f"{Path(data).name} / {split}: {len(utterances)} utterances" + ("" if dtype == "float32" else
                                                                               f", adapters in {dtype}")
        markdown = format_table(table, title, best, select)
        jsonl = write_report(out, markdown, utterance_lines(utterances, outputs, details))
        return {"table": table, "best": best, "markdown": markdown, "out": out, "jsonl": jsonl}

    partial = out.parent / f".{out.stem}.partial"  # the outputs decoded so far, kept until the table is written
    for i, a in enumerate(names):
        cache = cache_path(out, a, ds, llm, whisper, max_new_tokens, requested, dtype)
        ran = run_adapter(a, ds, llm, whisper, device, max_new_tokens, progress, requested, cache, likeliest, dtype)
        outputs.update({a if decode == "greedy" else f"{a} ({decode})": outs for decode, outs in ran.items()})
        if i < len(names) - 1:
            report()  # the finished adapters' rows are on disk even if a later adapter fails
    result = report()
    shutil.rmtree(partial, ignore_errors=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "demo"), help="prepared folder (default data/demo)")
    parser.add_argument("--split", default="test", help="split to score (default test)")
    parser.add_argument("--adapter", nargs="+", default=None,
                        help="adapter checkpoint(s) to compare (default: the best checkpoint of the latest "
                             "training run in out/; with none, only the 1-best and oracle rows)")
    parser.add_argument("--limit", type=int, help="score only the first N utterances")
    parser.add_argument("--out", help="Markdown table path (default out/eval/<split>.md; the JSONL goes beside it)")
    parser.add_argument("--llm", help="LLM checkpoint folder (default: the one the adapter was trained with)")
    parser.add_argument("--whisper", help="Whisper whose cross-attention the adapter copies "
                                          "(default: the one the adapter was trained with)")
    parser.add_argument("--max-new-tokens", type=int, default=150, help="the paper's 150")
    parser.add_argument("--select", choices=NORMALISATIONS, default="raw",
                        help="which WER names the best adapter when several are given (default raw)")
    parser.add_argument("--rescore", action="store_true",
                        help="add LLM n-best rescoring rows: the hypothesis the frozen LLM likes best, alone and "
                             "interpolated with Whisper's log-prob (weight tuned on --tune-split)")
    parser.add_argument("--tune-split", default="dev", help="split that tunes the rescoring weight (default dev)")
    parser.add_argument("--likeliest", action="store_true",
                        help="add a row per adapter decoded with generate.py's --decode likeliest: of the greedy "
                             "output and the n-best, the response the adapter model scores highest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="the adapters' frozen weights (default float32, as the README's tables; bfloat16 "
                             "decodes ~2x faster on a CPU with bf16 matmuls)")
    add_adapter_flags(parser)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        if args.limit is not None and args.limit < 1:
            raise EvalError("--limit must be at least 1")
        if args.max_new_tokens < 1:
            raise EvalError("--max-new-tokens must be at least 1")
        result = evaluate(args.data, args.split, args.adapter, args.limit, args.out, args.llm, args.whisper,
                          args.device, args.max_new_tokens, args.select, requested=adapter_requests(args),
                          rescoring=args.rescore, tune_split=args.tune_split, likeliest=args.likeliest,
                          dtype=args.dtype)
    except (ProjectError, OSError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the table is untouched; the outputs decoded so far are in the .partial folder
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    print(result["markdown"], end="")
    print(f"wrote {result['out']} and {result['jsonl']}", file=sys.stderr)


if __name__ == "__main__":
    main()
