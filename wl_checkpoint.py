"""This project's own Whispering-LLaMA files, and assembling the model from them.

    converted LLM folder ─┐
    Whisper model ────────┼─► build_model: built on the meta device, the LLM's weights assigned (not copied),
    adapter file ─────────┘   the adapters initialised (or loaded), Whisper's k/v projections copied

Only the adapters are trained (mark_only_adapter_as_trainable; Whisper's projections are frozen copies).
The adapter file is a .safetensors of the trained tensors (adapter_state_dict) whose metadata
records what rebuilds the model: the adapter settings (ADAPTER_FIELDS of adapter.WLConfig) and the LLM and
Whisper checkpoints it was trained on. The reference research code's .pth adapters load too, renamed by
REFERENCE_NAMES. External LLM and Whisper formats are convert_checkpoint.py's; the mechanism is adapter.py's.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from adapter import VARIANTS, WhisperingLLaMA, WLConfig, is_adapter_param
from convert_checkpoint import load_torch_file
from model import Config
from storage import (ConversionError, check_state, describe_file, empty_init, load_weights, read_json_config,
                     read_safetensors, write_atomic)
from whisper_model import Whisper

# ------------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------------

def wl_config(llm_config: Config, whisper_dims=None, **overrides) -> WLConfig:
    """The adapter config for an LLM config and a Whisper model's dimensions (whisper_model.ModelDimensions)."""
    kwargs = dict(llm_config.to_dict())
    if whisper_dims is not None:
        kwargs.update(whisper_width=whisper_dims.n_audio_state, whisper_heads=whisper_dims.n_audio_head,
                      whisper_layers=whisper_dims.n_text_layer)
    kwargs.update(overrides)
    return WLConfig.from_dict(kwargs)


def build_model(llm_dir, whisper=None, device="cpu", **overrides) -> WhisperingLLaMA:
    """A WhisperingLLaMA from a converted LLM checkpoint folder and a Whisper model (whisper_model.Whisper)
    whose cross-attention projections are copied. The adapters get the paper's initialisation
    (or the ablation's)."""
    llm_dir = Path(llm_dir)
    llm_config = read_json_config(llm_dir / "config.json", Config.from_dict, "an LLM config")
    dims = whisper.dims if whisper is not None else None
    if dims is None:
        overrides.setdefault("use_whisper", False)
    config = wl_config(llm_config, dims, **overrides)
    with empty_init():
        model = WhisperingLLaMA(config)
    weights = llm_dir / "model.safetensors"
    missing = load_weights(model, read_safetensors(weights, device=device), where=weights)  # errors name the file
    # Everything the LLM file lacks must be adapter state (built now) or Whisper's (copied below).
    unexpected = [n for n in missing if "adapter_" not in n and "whisper_" not in n]
    if unexpected:
        raise ValueError(f"{llm_dir} lacks {unexpected[0]!r}: does it match config.json?")
    materialise_adapters(model, device)
    if config.use_whisper:
        if whisper is None:
            raise ValueError("use_whisper=True needs a Whisper model to copy its cross-attention from")
        copy_whisper_projections(model, whisper)
    mark_only_adapter_as_trainable(model)
    return model


def materialise_adapters(model: WhisperingLLaMA, device="cpu"):
    """Give the adapter parameters (still on the meta device after loading the LLM) real storage and
    their initial values."""
    for block in model.adapter_blocks():
        for module in block.attn.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(module, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=torch.float32)))
    model._init_weights(model)  # the adapters' initialisation, exactly as at construction


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_param(name)


def adapter_state_dict(model: nn.Module) -> dict:
    """Only the trained tensors: a few MB, independent of the LLM's size."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_param(name)}


@torch.no_grad()
def copy_whisper_projections(model: WhisperingLLaMA, whisper) -> None:
    """Copy the cross-attention key/value projections of the mapped Whisper decoder blocks (frozen)."""
    if not model.config.use_whisper:
        return
    for i, block in enumerate(model.adapter_blocks(), start=model.config.adapter_start_layer):
        attn = block.attn
        dtype = attn.adapter_q_dim.dtype  # the adapters' dtype (float32 after materialise_adapters)
        wk, wv, bv = (t.to(dtype) for t in cross_attention_kv(whisper, model.config.whisper_block(i)))  # copies
        attn.whisper_key.weight = nn.Parameter(wk, requires_grad=False)
        attn.whisper_value.weight = nn.Parameter(wv, requires_grad=False)
        attn.whisper_value.bias = nn.Parameter(bv, requires_grad=False)


def cross_attention_kv(model: Whisper, j: int):
    """Decoder block j's cross-attention key/value projections as detached copies, nn.Linear (out, in)
    convention: (Wk (W, W), Wv (W, W), bv (W,)); k = A @ Wkᵀ (no bias), v = A @ Wvᵀ + bv.
    The Whispering-LLaMA adapter initialises its frozen audio projections from them."""
    n = len(model.decoder.blocks)
    if not 0 <= j < n:
        raise IndexError(f"decoder block {j} does not exist (the model has {n})")
    attn = model.decoder.blocks[j].cross_attn
    return (attn.key.weight.detach().clone(), attn.value.weight.detach().clone(),
            attn.value.bias.detach().clone())



# ------------------------------------------------------------------------------------------------------
# The adapter file format
# ------------------------------------------------------------------------------------------------------

# The reference research code (a lit-llama fork) names the same tensors differently and stores the
# down/up projections as right-multiplied matrices (x @ M), i.e. transposed relative to nn.Linear:
#     reference name (in transformer.h.{i}.attn.)   this project            transform
REFERENCE_NAMES = {
    "adapter_wte.weight": ("adapter_prefix.weight", False),
    "gating_factor": ("adapter_gate_prefix", False),
    "projection_gating_factor": ("adapter_gate_whisper", False),
    "projection_rms_key.scale": ("adapter_norm_k.weight", False),
    "projection_rms_value.scale": ("adapter_norm_v.weight", False),
    "projection_key_matrix_down": ("adapter_down_k.weight", True),
    "projection_key_matrix_up": ("adapter_up_k.weight", True),
    "projection_value_matrix_down": ("adapter_down_v.weight", True),  # WL-L only
    "projection_value_matrix_up": ("adapter_up_v.weight", True),  # WL-L only
    "projection_query_matrix_128to128": ("adapter_q_dim", False),
    "projection_query_matrix_32to32": ("adapter_q_head", False),
}


def from_reference_names(state: dict) -> dict:
    """Rename an adapter checkpoint saved by the reference code (`kv_layout="paper"` reproduces it).
    Its keys look like `transformer.h.5.attn.projection_key_matrix_down`."""
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.partition(".attn.")
        if leaf not in REFERENCE_NAMES:
            raise ValueError(f"unknown tensor {name!r} in the reference adapter checkpoint")
        ours, transpose = REFERENCE_NAMES[leaf]
        out[f"{prefix}.attn.{ours}"] = tensor.t().contiguous() if transpose else tensor
    return out


# The adapter fields of WLConfig: together with the LLM and Whisper checkpoints they rebuild the model.
ADAPTER_FIELDS = ("adapter_prompt_length", "adapter_start_layer", "variant", "kv_layout", "adapter_norm_eps",
                  "use_whisper", "random_audio", "identity_init", "trim_audio")


def save_adapter(model: WhisperingLLaMA, path, llm=None, whisper=None, extra=None) -> Path:
    """Write the trained tensors to a .safetensors file, atomically, with what is needed to rebuild the
    model in its metadata: the adapter config and the LLM / Whisper checkpoints it was trained on."""
    meta = {
        "format": "whispering-llama-adapter",
        "config": json.dumps({k: getattr(model.config, k) for k in ADAPTER_FIELDS}),
        "llm": str(llm or ""), "whisper": str(whisper or ""), **{k: str(v) for k, v in (extra or {}).items()},
    }
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    return write_atomic(path, safetensors_bytes(state, metadata=meta))


# What an adapter file should be, for the end of an error message about one that is not.
EXPECTED_ADAPTER = "expected an adapter checkpoint (a .safetensors saved by train.py, or the reference code's .pth)"


def read_adapter_meta(path) -> dict:
    """{"config": adapter fields, "llm": ..., "whisper": ..., ...} from an adapter file saved by save_adapter
    (empty dict for a file without that metadata). A file that is not a complete safetensors file is a one-line
    ValueError saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # SafetensorError: cut short, another format, empty
        kind = describe_file(path)
        raise ValueError(f"{path}: {kind}, not a complete safetensors file; {EXPECTED_ADAPTER}") from None
    if meta.get("format") != "whispering-llama-adapter":
        return {}
    try:
        meta["config"] = json.loads(meta.get("config", "{}"))
    except ValueError:
        raise ValueError(f"{path}: its metadata's adapter config is not valid JSON; {EXPECTED_ADAPTER}") from None
    return meta


def is_reference_state(state: dict) -> bool:
    """Tensors named as the reference research code saves them (`...attn.adapter_wte.weight`, `projection_*`)."""
    return any(".attn.projection_" in k or k.endswith(".attn.adapter_wte.weight") or ".attn.gating_factor" in k
               for k in state)


def settings_from_state(state: dict) -> dict:
    """The WLConfig fields that an adapter's tensors (in this project's names) determine by their names and
    shapes: the start layer (first block present), the prompt length (rows of the prefix), text-only or WL
    (Whisper tensors present or not) and the variant (separate value down/up → L; otherwise the bottleneck
    width W/r gives r: 16 → M, 32 → S)."""
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")})
    prefix = [v for k, v in state.items() if k.endswith("attn.adapter_prefix.weight")]
    if not blocks or not prefix:
        raise ValueError("no adapter tensors (transformer.h.<i>.attn.adapter_prefix.weight, ...) in the file")
    settings = dict(adapter_start_layer=blocks[0], adapter_prompt_length=prefix[0].shape[0],
                    use_whisper=any(k.endswith("attn.adapter_down_k.weight") for k in state))
    if settings["use_whisper"]:
        down = next(v for k, v in state.items() if k.endswith("attn.adapter_down_k.weight"))  # (W/r, W)
        r = down.shape[1] // down.shape[0]
        if any(k.endswith("attn.adapter_down_v.weight") for k in state):
            settings["variant"] = "L"
        else:
            shared = [name for name, (rank, shared) in VARIANTS.items() if shared and rank == r]
            if not shared:
                raise ValueError(f"a shared down/up of width W/{r} is none of the variants {', '.join(VARIANTS)}")
            settings["variant"] = shared[0]
    return settings


def read_adapter_file(path):
    """(state in this project's names, settings) of an adapter file: this project's .safetensors (whose
    metadata records every setting) or the reference research code's .pth.

    settings: what the file determines about the model that must run it, as WLConfig fields plus "hypotheses"
    (the n-best text form it was trained on, prepare_data.HYPOTHESIS_FORMS). A reference file determines
    kv_layout="paper" and hypotheses="reference" (its code's head split and prompt form), and its tensors the
    variant, prompt length, start layer and text-only vs WL; a .safetensors without metadata only the latter."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint {path} not found")
    settings = {}
    try:
        if path.suffix == ".safetensors":
            meta = read_adapter_meta(path)
            state = read_safetensors(path)
            if meta:
                settings.update(meta["config"], hypotheses=meta.get("hypotheses") or "logprob")
        else:
            state = load_torch_file(path)  # weights_only: a pickle that would run code is refused, in one line
    except ConversionError as e:
        raise ValueError(f"{e}; {EXPECTED_ADAPTER}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        what = type(state).__name__ if not isinstance(state, dict) else "a dict of other things than tensors"
        raise ValueError(f"{path}: a PyTorch file holding {what}, not a state dict of tensors; {EXPECTED_ADAPTER}")
    if not any(".attn.adapter_" in k or ".attn.projection_" in k or ".attn.gating_factor" in k for k in state):
        first = min(state, default=None)  # by name: the same whatever order the file keeps
        raise ValueError(f"{path}: {len(state)} tensor{'s' if len(state) != 1 else ''} (first: {first!r}) and no "
                         f"adapter tensors among them; {EXPECTED_ADAPTER}")
    try:
        if is_reference_state(state):
            state = from_reference_names(state)
            settings.update(kv_layout="paper", hypotheses="reference")
        derived = settings_from_state(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    for k, v in derived.items():
        if settings.get(k, v) != v:
            raise ValueError(f"{path}: its metadata says {k}={settings[k]!r} but its tensors say {v!r}")
        settings[k] = v
    return state, settings


def merge_settings(path, settings: dict, requested: dict) -> dict:
    """The file's settings with the caller's (command-line flags; None = not given) filling what the file
    leaves open. A flag that contradicts the file is refused: the file's tensors only compute the function
    they were trained for."""
    merged = dict(settings)
    for k, v in requested.items():
        if v is None:
            continue
        if k in settings and settings[k] != v:
            raise ValueError(f"{path} is an adapter with {k}={settings[k]!r}; it cannot run with {k}={v!r}")
        merged[k] = v
    return merged


def load_adapter_state(model: nn.Module, state: dict) -> None:
    """Load adapter tensors saved by `adapter_state_dict` (or renamed by `from_reference_names`) into a model."""
    own = {name: p for name, p in model.named_parameters() if is_adapter_param(name)}
    missing, extra, wrong = check_state({n: p.shape for n, p in own.items()}, state)
    if missing or extra:
        what = f"missing {sorted(missing)[0]!r}" if missing else f"unexpected {sorted(extra)[0]!r}"
        raise ValueError(f"adapter checkpoint does not match the model ({what}): check variant, start layer and "
                         "the LLM's depth")
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"adapter tensor {name!r} has shape {got}, the model expects {want}: an adapter for "
                         "another LLM or Whisper size, or another variant")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state[name].to(p.dtype))


def load_adapter_file(model: nn.Module, path) -> None:
    """Load an adapter checkpoint (this project's .safetensors, or the reference code's .pth) into a model
    built with matching settings."""
    state, _ = read_adapter_file(path)
    try:
        load_adapter_state(model, state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
