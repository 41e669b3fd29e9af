"""The Hugging Face Hub as a second registry: one repository per model name, one commit per version,
tagged ``v<version>``; ``models.v1`` then announces ``hf://<repo>@<commit>``, a pinned revision that
``fetch_package`` downloads with ``huggingface_hub.snapshot_download`` and verifies file by file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from libs.common.model_package.files import package_digest, read_package, verify_package
from libs.common.model_package.registry import PublishedPackage
from libs.common.model_package.schema import HF_SCHEME, PackageError

@dataclass(frozen=True)
class UploadPlan:
    """What ``HubPublisher.publish`` sends: one commit adding every file, then a version tag."""

    repo_id: str
    files: list[tuple[str, Path]]  # (path in repo, local file)
    commit_message: str
    tag: str


class HubPublisher:
    """Publishes packages to the Hugging Face Hub; one repository per model name.

    ``repo_id`` may hold ``{model}`` (e.g. ``my-org/{model}``), filled with the package's name; a
    repo id without it serves a single model. ``token`` comes from the environment
    (``KLINEBUS_HF_TOKEN``); ``endpoint`` points at another Hub (a mirror, a test server).
    """

    def __init__(self, repo_id: str, token: str, endpoint: str | None = None, private: bool = True) -> None:
        if not repo_id or not token:
            raise PackageError("Hub publishing needs both a repo id and a token")
        self.repo_template = repo_id
        self.token = token
        self.endpoint = endpoint
        self.private = private

    def repo_for(self, name: str) -> str:
        return self.repo_template.replace("{model}", name)

    def plan(self, package_dir: str | Path) -> UploadPlan:
        package_dir = Path(package_dir)
        meta = verify_package(package_dir)
        files = [(p.relative_to(package_dir).as_posix(), p) for p in sorted(package_dir.rglob("*")) if p.is_file()]
        return UploadPlan(
            repo_id=self.repo_for(meta.name),
            files=files,
            commit_message=f"{meta.name} v{meta.version} ({meta.kind}, promoted={meta.promoted}, sha256 {meta.sha256[:12]})",
            tag=f"v{meta.version}",
        )

    def publish(self, package_dir: str | Path) -> PublishedPackage:
        """Upload one package as one commit and tag it; returns ``hf://<repo>@<commit>``."""
        from huggingface_hub import CommitOperationAdd, HfApi

        plan = self.plan(package_dir)
        meta = read_package(package_dir)
        api = HfApi(endpoint=self.endpoint, token=self.token)
        api.create_repo(plan.repo_id, private=self.private, exist_ok=True)
        refs = api.list_repo_refs(plan.repo_id)
        existing = [int(t.name[1:]) for t in refs.tags if re.fullmatch(r"v\d+", t.name)]
        if existing and int(meta.version) <= max(existing):
            raise PackageError(
                f"{plan.repo_id} already has v{max(existing)}; versions only grow (package is v{meta.version})"
            )
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local)) for rel, local in plan.files]
        info = api.create_commit(plan.repo_id, operations=ops, commit_message=plan.commit_message)
        api.create_tag(plan.repo_id, tag=plan.tag, revision=info.oid)
        return PublishedPackage(meta.name, meta.version, f"{HF_SCHEME}{plan.repo_id}@{info.oid}", package_digest(package_dir), meta)
