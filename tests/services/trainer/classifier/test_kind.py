"""The chart classifier is a kind of the trainer's registry, and a trainer job's options reach it."""

from __future__ import annotations

from services.trainer.classifier import kind
from services.trainer.classifier.jobs import ClassifierTrainOptions, options_from
from services.trainer.classifier.pipeline import ClassifierOptions, resolved_lr
from services.trainer.datasets import get_kind
from services.trainer.jobs import TrainOptions


def test_the_kind_is_registered_with_the_trainer():
    k = get_kind("chart-classifier")
    assert k.build is kind.build and k.train is kind.train


def test_job_options_map_onto_the_classifier_and_default_to_encoders_that_need_no_network():
    o = options_from(TrainOptions(registry="/r", epochs=3, device="cpu", seed=7, batch_size=4, hub_repo_id="me/{model}"))
    assert (o.registry, o.epochs, o.device, o.seed, o.batch_size, o.hub_repo_id) == ("/r", 3, "cpu", 7, 4, "me/{model}")
    assert (o.vision, o.text, o.patience) == ("small-vit", "minilm", 2)
    assert o.lr is None  # resolved from the encoders (pipeline.resolved_lr)
    o = options_from(ClassifierTrainOptions(registry="/r", vision="/models/vit", text="/models/bert", train_text=False,
                                            lr=1e-4, dropout=0.3, image_size=112, threads=2))
    assert (o.vision, o.text, o.train_text, o.train_vision, o.epochs) == ("/models/vit", "/models/bert", False, True, 5)
    assert (o.lr, o.dropout, o.image_size, o.threads) == (1e-4, 0.3, 112, 2)


def test_the_learning_rate_follows_the_image_encoder():
    assert resolved_lr(ClassifierOptions(registry="/r")) == 3e-4  # random-init small ViT
    assert resolved_lr(ClassifierOptions(registry="/r", vision="google/vit-base-patch16-224")) == 2e-5  # the seed's
    assert resolved_lr(ClassifierOptions(registry="/r", vision="google/vit-base-patch16-224", lr=1e-3)) == 1e-3
