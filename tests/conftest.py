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


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2 tokenizer (read from its GGUF file)."""
    from convert_checkpoint import smollm2_gguf_path
    from tokenizer import Tokenizer

    return Tokenizer.from_file(smollm2_gguf_path())


@pytest.fixture(scope="session")
def tiny_smol(tmp_path_factory, smol_tokenizer):
    """(LLM checkpoint folder, Whisper): a tiny random LLM with SmolLM2's vocabulary, saved as a checkpoint with
    its tokenizer, and a tiny random Whisper (width 32, 2 heads), for the correction and explain tests."""
    import model as M
    import whisper_model as wm
    from convert_checkpoint import save_checkpoint, smollm2_gguf_path
    from tokenizer import gguf_to_tokenizer_json

    torch.manual_seed(0)
    cfg = M.Config(name="tiny-smol", block_size=1024, vocab_size=smol_tokenizer.vocab_size, n_layer=3, n_head=4,
                   n_query_groups=2, n_embd=64, intermediate_size=128, tie_embeddings=True)
    llm = M.LLaMA(cfg)
    with torch.no_grad():  # unit-variance activations (GPT-style 0.02 makes a tied model echo its last token)
        for name, p in llm.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if "wte" in name else p.shape[1] ** -0.5)
    llm_dir = tmp_path_factory.mktemp("tiny-smol")
    save_checkpoint(llm_dir, {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}, cfg.to_dict())
    gguf_to_tokenizer_json(smollm2_gguf_path(), llm_dir)
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                              n_vocab=51864, n_text_ctx=16, n_text_state=32, n_text_head=2, n_text_layer=2)
    return llm_dir, wm.Whisper(dims).eval()
