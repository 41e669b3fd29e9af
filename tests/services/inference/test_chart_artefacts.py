"""A chart classifier reads the chart's PNG only from the artefact root: the real ``ChartServing``
(services/inference/charts.py) with the real reader, a classifier that records what it is fed.
Every refused uri is a dead letter on charts.v1 with one line and a metric; the model never runs."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from libs.common import topics
from libs.common.artefacts import PNG_SIGNATURE, ArtefactRoot
from libs.common.contracts import ChartEvent
from libs.common.telemetry import ServiceMetrics
from services.inference.charts import ChartServing

PNG = PNG_SIGNATURE + b"\x00" * 64


@dataclass
class Recorder:
    """Stands in for a loaded classifier: serves BTCUSDT 15m, preset classifier224, window 30."""

    fed: list

    def __post_init__(self):
        self.spec = SimpleNamespace(name="cls", label="cls@1", preset="classifier224", meta=SimpleNamespace(lookback=30),
                                    serves=lambda s, i: (s, i) == ("BTCUSDT", "15m"))

    def predict(self, png, candle, uri):
        self.fed.append(png)
        raise AssertionError("a refused chart reached the model")


def event(uri: str) -> ChartEvent:
    return ChartEvent(symbol="BTCUSDT", interval="15m", open_time=1_700_000_100_000, uri=uri, window=30,
                      first_open_time=1_700_000_100_000 - 29 * 900_000, preset="classifier224", width=224, height=224)


@pytest.mark.parametrize("case", ["proc-environ", "dev-zero", "not-png", "oversized", "outside-url", "outside-path", "dotdot"])
async def test_a_chart_uri_the_artefact_root_refuses_is_a_dead_letter(tmp_path, case):
    root = tmp_path / "charts"
    root.mkdir()
    (root / "env.png").write_text("KLINEBUS_HF_TOKEN=hf_s3cr3t\n")
    (root / "big.png").write_bytes(PNG + b"\0" * 100)
    (tmp_path / "other.png").write_bytes(PNG)
    uri = {"proc-environ": "file:///proc/self/environ", "dev-zero": "file:///dev/zero",
           "not-png": (root / "env.png").as_uri(), "oversized": (root / "big.png").as_uri(),
           "outside-url": "http://169.254.169.254/latest/meta-data/", "outside-path": str(tmp_path / "other.png"),
           "dotdot": f"{root}/../other.png"}[case]
    registry = CollectorRegistry()
    metrics = ServiceMetrics("inference_chart_test", registry=registry)
    letters = []

    async def dead_letter(source, raw, reason):
        letters.append((source, raw, reason))

    fed: list = []
    serving = ChartServing(SimpleNamespace(), None, None, dead_letter, metrics,
                           artefacts=ArtefactRoot(str(root), max_bytes=len(PNG), metrics=metrics))
    serving.models["cls"] = Recorder(fed)
    await serving.on_chart(event(uri))
    assert fed == []
    ((source, raw, reason),) = letters
    kind = {"not-png": "not_png", "oversized": "too_large"}.get(case, "outside_root")
    assert source == topics.CHARTS and f"cannot read it ({kind}: " in reason and "\n" not in reason
    assert "s3cr3t" not in reason
    got = registry.get_sample_value("klinebus_inference_chart_test_chart_errors_total", {"model": "cls", "reason": "refused_uri"})
    assert got == 1.0
    assert registry.get_sample_value("klinebus_inference_chart_test_artefact_reads_refused_total", {"kind": kind}) == 1.0


def test_chart_serving_will_not_start_without_an_artefact_root():
    with pytest.raises(ValueError, match="artefact root"):
        ChartServing(SimpleNamespace(), None, None, None, ServiceMetrics("inference_chart_test2", registry=CollectorRegistry()))


@pytest.mark.parametrize("tokenizer", ["/etc", "../../outside", "tokenizer/../../outside", "link"])
def test_a_tokenizer_path_that_leaves_the_package_is_refused(tmp_path, tokenizer):
    """``folder / "/etc"`` is ``/etc``: the tokenizer path a package names must resolve inside it."""
    from libs.common import model_package as mp
    from services.inference.chart_models import chart_spec

    folder = tmp_path / "pkg"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "vocab.txt").write_text("[PAD]\n")
    t = lambda n, d, s: mp.TensorSpec(name=n, dtype=d, shape=s)  # noqa: E731
    meta = mp.ModelPackage(
        name="cls", version="1", kind="chart-classifier",
        inputs=[t("image", "uint8", ["batch", 224, 224, 3]), t("input_ids", "int64", ["batch", 16]),
                t("attention_mask", "int64", ["batch", 16])],
        outputs=[t("probabilities", "float32", ["batch", 3]), t("next_close_scaled", "float32", ["batch", 1])],
        feature_set="", features=[], lookback=30, horizons=[1], serves=[mp.Served(symbol="BTCUSDT", interval="15m")],
        scalers={"next_close": mp.Scaler(kind="standard", columns=["next_close"], center=[0.0], scale=[0.01])},
        ranges=mp.Ranges(train=mp.TimeRange(start=0, end=1, rows=2), validation=mp.TimeRange(start=2, end=3, rows=2),
                         test=mp.TimeRange(start=4, end=5, rows=2)),
        metrics={}, baseline_metrics={}, promoted=True, sha256="", code_version="tests",
        config={"text": {"template": "{close}", "tokenizer": tokenizer}},
    )
    mp.write_manifest(folder)
    (folder / "link").symlink_to(tmp_path / "outside")  # after the manifest, which refuses links
    with pytest.raises(mp.PackageError, match="leaves the package|outside the package"):
        chart_spec(meta, folder)
    ok = meta.model_copy(update={"config": {"text": {"template": "{close}", "tokenizer": "tokenizer/"}}})
    assert chart_spec(ok, folder).folder == folder  # the package's own folder is fine
