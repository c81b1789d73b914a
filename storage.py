"""Files on disk, read and written safely: the few helpers every other file shares.

- `read_safetensors` / `describe_file`: a file that is not what was expected fails in one line that says
  what it holds ("a safetensors file cut short (3996 of 4104 bytes)"), not in a library's traceback;
- `check_state`: the one name-and-shape check behind every loader (LLM, Whisper, adapter, converted
  checkpoints); each caller words the mismatch for its own reader. `load_weights` does so for a file that may
  leave parameters to the caller (the adapter's), `check_exact_state` for one that must hold exactly the
  model's tensors (Whisper's);
- `empty_init`: build a model whose values will come from a file, with no memory and no random draws;
- `write_atomic`: a file is either the old one or the whole new one, never half written;
- `ProjectError` / `first_line`: every error a user can cause derives from ProjectError (`ConversionError` and
  `InputError`, for the files they read, are here too), and every script's `main()` catches it once and
  prints its first line.

This file imports nothing from the project, so the model files can use it without an import cycle.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


class _SkipInit(TorchFunctionMode):
    """Every torch.nn.init function returns its tensor untouched (see empty_init)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def empty_init():
    """`with empty_init(): model = LLaMA(config)`: every tensor on the meta device (no memory), and the
    torch.nn.init draws skipped, since the checkpoint's values replace them. The meta device alone would run
    those draws (and any arithmetic) through torch's Python reference kernels, whose first use imports
    torch._dynamo: 1.2 s of every generate.py start on 2 cores. Constructors must compute fixed buffers (RoPE,
    sinusoids) on the CPU, or leave them to the checkpoint."""
    with torch.device("meta"), _SkipInit():
        yield


class ProjectError(Exception):
    """A failure the user can fix (a missing file, a damaged checkpoint, a bad flag value): printed as one line."""


class ConversionError(ProjectError, ValueError):
    """A source that cannot be converted or loaded (missing, truncated, or not matching its config). Also a
    ValueError, so that the loaders of converted checkpoints raise what their callers catch."""


class InputError(ProjectError):
    """An input (manifest, folder, n-best file, prepared folder) that cannot be read or used."""


def first_line(e: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none), for `error: ...`."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_atomic(path, data) -> Path:
    """Write `data` (str, bytes, or a function that writes into the binary file it is given) to `.<name>.tmp`
    beside `path`, flush it to disk, then rename it over `path`: a crash leaves the old file or the whole new
    one, never half of one. The temporary name is fixed, so a rerun after a kill overwrites the leftover."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path, device="cpu") -> dict:
    """safetensors' load_file, with a one-line ConversionError that says what the file holds when it is not a
    complete safetensors file (cut short by a copy, another format, empty)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # SafetensorError for a truncated or foreign file; OSError
        if not Path(path).is_file():
            raise ConversionError(f"{path}: no such file") from None
        kind = describe_file(path)
        # a complete-looking file that still fails: safetensors' reason says more than its size does
        reason = f" ({first_line(e)})" if kind.startswith("a safetensors file (") else ""
        raise ConversionError(f"{path}: {kind}, not a complete safetensors file{reason}") from None


def describe_file(path) -> str:
    """What a file that failed to load holds, as far as its size and first bytes tell, for error messages that
    say what a file is and not only what a reader disliked: "an empty file", "a safetensors file cut short
    (3996 of 4104 bytes)", "a text file (17 bytes)", ..."""
    import zipfile

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"GGUF":
        return f"a GGUF file ({size} bytes)"
    if head[:4] == b"PK\x03\x04":  # torch.save's format since torch 1.6
        if zipfile.is_zipfile(path):
            return f"a zip archive ({size} bytes)"
        return f"a zip archive cut short or damaged ({size} bytes; torch.save writes zip archives)"
    if head[:1] == b"\x80":  # pickle protocol 2+ (torch.save's legacy format starts with one)
        return f"a pickle ({size} bytes)"
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if head[8:9] == b"{" and 2 <= n < 1 << 30:  # safetensors: u64 header length, then a JSON header
        return _describe_safetensors(path, size, n)
    text = head.decode("utf-8", errors="replace")
    if "\x00" not in text and "\ufffd" not in text[:-3]:  # the read may cut the last character in two
        return f"a text file ({size} bytes)"
    return f"binary data of no format known here ({size} bytes)"


def _describe_safetensors(path: Path, size: int, n: int) -> str:
    if size < 8 + n:
        return f"a safetensors file cut short ({size} of at least {8 + n} bytes)"
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"a safetensors file with a damaged header ({size} bytes)"
    if size < 8 + n + end:
        return f"a safetensors file cut short ({size} of {8 + n + end} bytes)"
    return f"a safetensors file ({size} bytes)"


def check_state(expected: dict, state: dict):
    """Compare a state dict with what a model expects ({name: shape}). Returns (missing, unexpected, wrong):
    names the state lacks, names the model lacks, and (name, shape in state, expected shape) for each tensor
    of another shape, all in the model's order (unexpected in the state's). The callers decide which of
    these is an error and say it in their reader's terms."""
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    wrong = [(n, tuple(state[n].shape), tuple(shape)) for n, shape in expected.items()
             if n in state and tuple(state[n].shape) != tuple(shape)]
    return missing, unexpected, wrong


def shapes(module: nn.Module, params_only: bool = False) -> dict:
    """{name: shape} of a module's parameters (and buffers unless params_only); free on the meta device."""
    items = module.named_parameters() if params_only else module.state_dict(keep_vars=True).items()
    return {n: tuple(t.shape) for n, t in items}


def check_exact_state(model: nn.Module, state: dict, where: str = "checkpoint"):
    """Raise a one-line ValueError unless `state` has exactly the model's tensors with the model's shapes: for
    a model whose file holds all of it (Whisper), where `load_weights` lets the caller initialise the rest."""
    missing, extra, wrong = check_state(shapes(model), state)
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensors (first: {missing[0]!r}): does it match its config?")
    if extra:
        raise ValueError(f"{where} has {len(extra)} unexpected tensors (first: {extra[0]!r}): does it match its "
                         "config?")
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"{where}: tensor {k!r} has shape {got}, the config says {want}")


def load_weights(model: nn.Module, state: dict, where=None) -> list:
    """Load `state` into a model built on the meta device, with a clear error on any mismatch (that starts
    with `where:`, the file's name, when given).

    Parameters absent from `state` must be ones the caller initialises itself (the adapter's); they are
    returned so it can do so. A tied lm_head may be absent from the file."""
    _, unexpected, wrong = check_state(shapes(model), state)
    at = f"{where}: " if where is not None else ""
    if unexpected:
        raise ValueError(f"{at}checkpoint has unexpected tensor {unexpected[0]!r}: does it match config.json?")
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"{at}tensor {name!r} has shape {got} in the checkpoint but {want} in the model: "
                         "does it match config.json?")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    return [n for n, _ in model.named_parameters() if n not in state and not (tied and n == "lm_head.weight")]


def read_json_config(path, cls, what: str):
    """cls(**json) for a checkpoint's config.json (cls a config dataclass or its `from_dict`), or a one-line
    ValueError that names the file: not JSON, unknown fields, inconsistent sizes."""
    try:
        return cls(json.loads(Path(path).read_text()))
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"{path}: not {what} ({e})") from None
