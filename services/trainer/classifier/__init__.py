"""The chart classifier (seed 001, CandleFusion): 224 px candlestick charts plus the last candle's
text, ViT patch tokens attended by BERT's [CLS] (8-head cross-attention), a 3-class head
(bearish / neutral / bullish) and a next-close head; judged beside naive baselines, exported to
ONNX with its tokenizer. Operator notes: docs/chart-classifier.md.

Modules: ``text`` (the seed's candle text), ``labels`` (classes, neutral band, scaled target),
``splits`` (time-ordered splits with an embargo), ``dataset`` (index + parallel rendering,
resumable), ``render`` (the chart renderer adapter), ``model`` (the fused torch model),
``data`` (torch datasets), ``train`` (the loop), ``scorecard`` (metrics beside baselines,
promotion), ``export`` (ONNX, checked with onnxruntime), ``package`` (the model package).
"""
