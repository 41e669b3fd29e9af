import pytest

from libs.llm.testing import TinyPair, write_tiny_qwen25vl


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """A random-weight Qwen2.5-VL-shaped GGUF pair written with the gguf package."""
    return write_tiny_qwen25vl(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="session")
def text_llama(tiny_pair: TinyPair):
    """The tiny text model alone in llama-cpp-python (grammar tests need no image)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_pair.model), n_ctx=2048, n_threads=1, verbose=False, seed=0)
    yield llm
    llm.close()
