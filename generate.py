"""Generate text with the LLM: the decoding loop every other script uses.

    python generate.py --prompt "The capital of France is"            # plain continuation, greedy
    python generate.py --prompt "What is 2+2?" --chat                  # wrapped in the model's chat template
    python generate.py --prompt "Once upon a time" --temperature 0.8 --top-k 50 --seed 1

With no --checkpoint-dir the embedded SmolLM2-135M-Instruct is used (converted on first use).

Decoding (`generate`) uses the KV cache: the prompt is run once in a single forward pass that fills the
cache (prefill), then each new token costs one forward pass over that token alone.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

import convert_checkpoint
from model import LLaMA
from tokenizer import Tokenizer

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


class GenerateError(Exception):
    """Bad input to generation (empty prompt, prompt longer than the model's context, ...)."""


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


@torch.inference_mode()
def generate(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             eos_id: Union[int, Iterable[int], None] = None, **model_kwargs) -> torch.Tensor:
    """Extend the prompt idx (T,) by up to max_new_tokens tokens; returns (T + n,).

    Generation stops when a token in eos_id (one id or several, e.g. EOS and an end-of-turn token) is
    drawn; that token is not included. model_kwargs go to every forward call (the adapter's audio)."""
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
        # Prefill: the whole prompt in one pass; only the last position's logits are needed.
        last = torch.zeros(1, T, dtype=torch.bool, device=device)
        last[0, -1] = True
        logits = model(idx[None], input_pos=torch.arange(T, device=device), logits_mask=last, **model_kwargs)[-1]
        tokens = [idx]
        for pos in range(T, max_len):
            next_id = sample(logits, temperature, top_k)  # (1,)
            if next_id.item() in stop:
                break
            tokens.append(next_id)
            if pos + 1 == max_len:
                break  # the last token's logits would never be used
            logits = model(next_id[None], input_pos=torch.tensor([pos], device=device), **model_kwargs)[0, -1]
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


def run_text(args) -> str:
    """--prompt without audio: the plain LLM."""
    if not args.prompt.strip():
        raise GenerateError("the prompt is empty")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="text to continue (or, with --chat, the user's message)")
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and activations dtype (default float32)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        parser.error("--top-k must be at least 1")
    torch.manual_seed(args.seed)
    try:
        print(run_text(args))
    except (GenerateError, convert_checkpoint.ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
