"""The chart classifier is a kind of the trainer's registry, and a trainer job's options reach it."""

from __future__ import annotations

from services.trainer.classifier import kind
from services.trainer.classifier.jobs import options_from
from services.trainer.classifier.model import DEFAULT_TEXT, DEFAULT_VISION
from services.trainer.datasets import get_kind
from services.trainer.jobs import TrainOptions


def test_the_kind_is_registered_with_the_trainer():
    k = get_kind("chart-classifier")
    assert k.build is kind.build and k.train is kind.train


def test_job_options_map_onto_the_classifier_and_default_to_the_seeds_encoders():
    o = options_from(TrainOptions(registry="/r", epochs=3, device="cpu", seed=7, batch_size=4, hub_repo_id="me/{model}"))
    assert (o.registry, o.epochs, o.device, o.seed, o.batch_size, o.hub_repo_id) == ("/r", 3, "cpu", 7, 4, "me/{model}")
    assert (o.vision, o.text, o.patience, o.lr) == (DEFAULT_VISION, DEFAULT_TEXT, 2, 2e-5)
    job = TrainOptions(registry="/r")
    job.vision, job.text, job.train_text = "/models/vit", "/models/bert", False  # fields a CLI may add
    o = options_from(job)
    assert (o.vision, o.text, o.train_text, o.epochs) == ("/models/vit", "/models/bert", False, 5)
