"""The fused model with tiny random encoders: shapes, that both inputs matter, persistence, and
one-line errors for encoders that cannot be used."""

from __future__ import annotations

import pytest
import torch

from services.trainer.classifier.model import CROSS_ATTENTION_HEADS, FusionConfig, ModelError, build_fusion, load_fusion

from .conftest import tiny_text, tiny_vision


def _batch(n: int = 3, tokens: int = 12, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, 224, 224, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(5, 100, (n, tokens), generator=g)
    mask = torch.ones(n, tokens, dtype=torch.long)
    mask[0, tokens // 2:] = 0
    return image, ids, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_fusion(FusionConfig(vision=tiny_vision(), text=tiny_text(128), dropout=0.0))
    return m.eval()


def test_outputs_three_logits_and_one_forecast_per_chart(model):
    logits, forecast = model(*_batch(3))
    assert logits.shape == (3, 3) and forecast.shape == (3,)
    assert model.cross.num_heads == CROSS_ATTENTION_HEADS == 8
    assert model.cross.kdim == model.vision.config.hidden_size


def test_the_answer_depends_on_the_chart_and_on_the_text(model):
    image, ids, mask = _batch(2)
    base = model(image, ids, mask)[0]
    other_image = model(torch.flip(image, dims=[1]), ids, mask)[0]
    other_text = model(image, torch.roll(ids, 1, dims=1), mask)[0]
    assert not torch.allclose(base, other_image, atol=1e-6)
    assert not torch.allclose(base, other_text, atol=1e-6)
    # padding is masked: changing a padded token changes nothing
    ids2 = ids.clone()
    ids2[0, -1] = 7
    assert torch.allclose(base, model(image, ids2, mask)[0], atol=1e-5)


def test_saved_model_reloads_without_the_hub(tmp_path, model):
    model.save(tmp_path / "m")
    again = load_fusion(tmp_path / "m").eval()
    batch = _batch(2)
    assert torch.equal(model(*batch)[0], again(*batch)[0])
    with pytest.raises(ModelError, match="not a saved chart classifier"):
        load_fusion(tmp_path / "nothing")


def test_encoders_that_cannot_be_used_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="cannot load the image encoder") as info:
        build_fusion(FusionConfig(vision=str(tmp_path / "no-such-model"), text=tiny_text(64)))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="224 px"):
        build_fusion(FusionConfig(vision={**tiny_vision(), "image_size": 96}, text=tiny_text(64)))
    with pytest.raises(ModelError, match="not divisible by 8"):
        build_fusion(FusionConfig(vision=tiny_vision(), text={**tiny_text(64), "hidden_size": 36, "num_attention_heads": 2}))


def test_a_smaller_image_encoder_sees_the_224_px_chart_average_pooled():
    torch.manual_seed(0)
    small = build_fusion(FusionConfig(vision={**tiny_vision(), "image_size": 32}, text=tiny_text(128), dropout=0.0)).eval()
    image, ids, mask = _batch(2)
    # Two charts that differ only inside 7x7 blocks but have the same block means pool alike.
    same_means = image.clone()
    same_means[:, 0, 0, :], same_means[:, 0, 1, :] = image[:, 0, 1, :], image[:, 0, 0, :]
    out = small(image, ids, mask)[0]
    assert out.shape == (2, 3)
    assert torch.allclose(out, small(same_means, ids, mask)[0], atol=1e-6)
    assert not torch.allclose(out, small(torch.flip(image, dims=[1]), ids, mask)[0], atol=1e-6)


def test_the_default_small_vit_is_a_random_init_config():
    from services.trainer.classifier.model import resolve_vision, small_vit

    cfg = resolve_vision("small-vit")
    assert cfg == small_vit() and cfg["model_type"] == "vit" and cfg["image_size"] == 224
    assert resolve_vision("small-vit", 56, 8)["image_size"] == 56
    with pytest.raises(ModelError, match="does not divide"):
        small_vit(100)
    with pytest.raises(ModelError, match="default image encoder"):
        resolve_vision("google/vit-base-patch16-224", image_size=112)
