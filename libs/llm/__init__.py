"""The llama-cpp-python layer shared by the VLM service and the trainer's LLM experiments:
model files (paths or a pinned Hugging Face revision), a strict JSON-schema -> GBNF grammar,
one model call at a time with a timeout, in-process and OpenAI-compatible remote backends,
and answer validation. Imports libs.common only."""
