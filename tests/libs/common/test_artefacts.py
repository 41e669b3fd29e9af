"""The one bounded chart reader (libs/common/artefacts.py): only PNGs under the artefact root, at
most max_bytes of them, through the root's own filesystem; everything else refused with a kind."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest
from prometheus_client import CollectorRegistry

from libs.common.artefacts import PNG_SIGNATURE, ArtefactRefused, ArtefactRoot
from libs.common.telemetry import ServiceMetrics

PNG = PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + b"\x00" * 64  # the signature is what is checked


@pytest.fixture
def root(tmp_path):
    (tmp_path / "charts" / "BTCUSDT").mkdir(parents=True)
    (tmp_path / "charts" / "BTCUSDT" / "a.png").write_bytes(PNG)
    return tmp_path / "charts"


def refused(reader: ArtefactRoot, uri: str) -> str:
    with pytest.raises(ArtefactRefused) as e:
        reader.read_png(uri)
    assert "\n" not in e.value.reason
    return e.value.kind


def test_a_png_under_the_root_is_read_by_path_or_file_url(root):
    reader = ArtefactRoot(str(root))
    assert reader.read_png(str(root / "BTCUSDT" / "a.png")) == PNG
    assert reader.read_png(f"file://{root}/BTCUSDT/a.png") == PNG
    assert ArtefactRoot(f"file://{root}").read_png(f"file://{root}/BTCUSDT/a.png") == PNG


def test_secrets_devices_and_other_places_are_refused_before_reading(root, tmp_path):
    reader = ArtefactRoot(str(root))
    (tmp_path / "charts-evil").mkdir()
    (tmp_path / "charts-evil" / "x.png").write_bytes(PNG)
    (root / "link.png").symlink_to("/proc/self/environ")
    for uri in ["file:///proc/self/environ", "/proc/self/environ", "file:///dev/zero", "/etc/passwd",
                f"file://{root}/../charts-evil/x.png", str(tmp_path / "charts-evil" / "x.png"), f"{root}/link.png",
                "http://169.254.169.254/latest/meta-data/", "https://example.com/a.png", "s3://bucket/a.png",
                f"memory://{root}/BTCUSDT/a.png", ""]:
        assert refused(reader, uri) == "outside_root", uri


def test_not_a_png_too_large_not_a_file_and_missing(root):
    reader = ArtefactRoot(str(root), max_bytes=len(PNG))
    (root / "env.png").write_bytes(b"KLINEBUS_REDIS_URL=redis://:hunter2@redis/0\n")
    (root / "big.png").write_bytes(PNG + b"\0")
    os.mkfifo(root / "pipe.png")  # would block a plain open() forever
    assert refused(reader, str(root / "env.png")) == "not_png"
    assert refused(reader, str(root / "big.png")) == "too_large"
    assert refused(reader, str(root / "pipe.png")) == "not_a_file"
    assert refused(reader, str(root / "BTCUSDT")) == "not_a_file"
    assert refused(reader, str(root / "gone.png")) == "unreadable"
    assert reader.read_png(str(root / "BTCUSDT" / "a.png")) == PNG  # exactly the cap is allowed


def test_an_object_store_root_allows_only_its_own_prefix():
    name = f"charts-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/{name}/BTCUSDT/a.png", PNG)
    fs.pipe(f"/{name}-other/a.png", PNG)
    reader = ArtefactRoot(f"memory://{name}")
    assert reader.read_png(f"memory:///{name}/BTCUSDT/a.png") == PNG
    assert refused(reader, f"memory:///{name}-other/a.png") == "outside_root"
    assert refused(reader, f"memory:///{name}/../{name}-other/a.png") == "outside_root"
    assert refused(reader, f"file:///{name}/BTCUSDT/a.png") == "outside_root"


def test_refusals_are_counted_by_kind(root):
    metrics = ServiceMetrics("artefacts_test", registry=CollectorRegistry())
    reader = ArtefactRoot(str(root), metrics=metrics)
    refused(reader, "file:///proc/self/environ")
    refused(reader, "file:///dev/zero")
    sample = metrics.registry.get_sample_value("klinebus_artefacts_test_artefact_reads_refused_total", {"kind": "outside_root"})
    assert sample == 2.0


def test_an_object_store_root_needs_no_client_library_until_it_reads():
    # A service that never reads a chart starts with KLINEBUS_ARTIFACT_URL=s3://... and no s3fs.
    reader = ArtefactRoot("s3://klinebus-artifacts/charts")
    assert reader.path_of("s3://klinebus-artifacts/charts/BTCUSDT/a.png") == "/klinebus-artifacts/charts/BTCUSDT/a.png"
    assert refused(reader, "s3://klinebus-artifacts/charts-other/a.png") == "outside_root"
    assert refused(reader, "s3://klinebus-artifacts/charts/../secrets/a.png") == "outside_root"
    assert refused(reader, "gs://klinebus-artifacts/charts/a.png") == "outside_root"
