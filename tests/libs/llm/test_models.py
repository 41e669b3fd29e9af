from __future__ import annotations

import shutil

import pytest

from libs.llm.models import ModelFileError, from_hub, from_paths

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_paths_resolve_to_checked_gguf_files(tiny_pair):
    files = from_paths(tiny_pair.model, tiny_pair.mmproj)
    assert files.model == tiny_pair.model and files.mmproj == tiny_pair.mmproj
    assert files.revision == "local" and files.model_name == tiny_pair.model.name


def test_missing_or_foreign_files_are_one_line_errors(tiny_pair, tmp_path):
    with pytest.raises(ModelFileError, match="mmproj file .* does not exist"):
        from_paths(tiny_pair.model, tmp_path / "mmproj-missing.gguf")
    png = tmp_path / "chart.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        from_paths(png, tiny_pair.mmproj)
    with pytest.raises(ModelFileError, match="is not a file"):
        from_paths(tmp_path, tiny_pair.mmproj)


def test_hub_revision_must_be_a_pinned_commit(tmp_path):
    with pytest.raises(ModelFileError, match="40-hex commit"):
        from_hub("ggml-org/Qwen2.5-VL-7B-Instruct-GGUF", "main", "m.gguf", "mm.gguf", cache_dir=tmp_path, local_files_only=True)


def test_hub_files_come_from_the_cache_without_network(tiny_pair, tmp_path):
    repo = "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF"
    with pytest.raises(ModelFileError, match="not in the local cache"):
        from_hub(repo, SHA, tiny_pair.model.name, tiny_pair.mmproj.name, cache_dir=tmp_path, local_files_only=True)
    # the hub's cache layout, as an init job (or `hf download --revision`) leaves it on a volume
    snap = tmp_path / "models--ggml-org--Qwen2.5-VL-7B-Instruct-GGUF" / "snapshots" / SHA
    snap.mkdir(parents=True)
    shutil.copy(tiny_pair.model, snap / tiny_pair.model.name)
    shutil.copy(tiny_pair.mmproj, snap / tiny_pair.mmproj.name)
    files = from_hub(repo, SHA, tiny_pair.model.name, tiny_pair.mmproj.name, cache_dir=tmp_path, local_files_only=True)
    assert files.model.read_bytes() == tiny_pair.model.read_bytes()
    assert files.revision == SHA and files.source == f"hf:{repo}"
