import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The embedded real weights, converted by the current converter into the session's temporary folder: never the
# git-ignored checkpoints/ cache (a stale conversion there would be tested instead, and tests would write into the
# repository).

@pytest.fixture(scope="session")
def embedded_llm_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its GGUF (about 7 s on 2 cores)."""
    import convert_checkpoint

    return convert_checkpoint.convert_smollm2_default(tmp_path_factory.mktemp("ckpt") / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def embedded_whisper_dir(tmp_path_factory):
    """Whisper tiny.en converted from its CTranslate2 model.bin."""
    import convert_checkpoint

    return convert_checkpoint.convert_whisper_tiny_en_default(tmp_path_factory.mktemp("ckpt") / "whisper-tiny.en")
