"""The LLM trade-advice experiment (seed 003), done so its answer can be trusted.

A preference dataset of minute-level advice (BUY / SELL / NOOP) from Binance 1m candles
(``dataset``), a scorecard of any GGUF model against random, majority-class and
same-as-last-minute baselines with confidence intervals (``evaluate``, ``scorecard``), and an
ORPO fine-tuning job for a GPU (``orpo``). Operator guide: docs/advice.md.
"""
