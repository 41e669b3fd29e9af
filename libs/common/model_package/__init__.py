"""The model package: the immutable folder the trainer writes, the registry stores and inference loads.

Split by concern (every public name is re-exported here, so ``from libs.common.model_package import
X`` and ``model_package.X`` keep working):

- ``schema``: ``klinebus.json`` (``ModelPackage`` and its parts), file names, ``PackageError``;
- ``files``: the manifest that hashes every file, containment (``inside``), write / read / verify;
- ``registry``: ``<root>/<model-name>/<version>/`` on a folder or any fsspec URL;
- ``fetch``: an announced package to a local folder, only from allowed ``Sources``;
- ``hub``: the Hugging Face Hub as a registry (one repository per model, a tag per version).

Layout and rules: ../shared/DESIGN.md, "Model packages"; trust: docs/threat-model.md, "Control topics".
"""

from libs.common.model_package.fetch import Sources, fetch_package
from libs.common.model_package.files import (
    IGNORED,
    MANIFEST_FORMAT,
    check_relative,
    code_version,
    inside,
    package_digest,
    read_manifest,
    read_package,
    sha256_file,
    verify_package,
    write_manifest,
    write_package,
)
from libs.common.model_package.hub import HubPublisher, UploadPlan
from libs.common.model_package.registry import PublishedPackage, Registry
from libs.common.model_package.schema import (
    CARD_FILE,
    FAST_MODEL_FILE,
    HF_SCHEME,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    PACKAGE_FORMAT,
    STAGING_PREFIX,
    TOKENIZER_DIR,
    ModelPackage,
    PackageError,
    Ranges,
    Scaler,
    Served,
    TensorSpec,
    TimeRange,
    parse_meta,
)

__all__ = [
    "CARD_FILE", "FAST_MODEL_FILE", "HF_SCHEME", "IGNORED", "MANIFEST_FILE", "MANIFEST_FORMAT", "META_FILE", "MODEL_FILE",
    "PACKAGE_FORMAT", "STAGING_PREFIX", "TOKENIZER_DIR", "HubPublisher", "ModelPackage", "PackageError",
    "PublishedPackage", "Ranges", "Registry", "Scaler", "Served", "Sources", "TensorSpec", "TimeRange",
    "UploadPlan", "check_relative", "code_version", "fetch_package", "inside", "package_digest", "parse_meta",
    "read_manifest", "read_package", "sha256_file", "verify_package", "write_manifest", "write_package",
]
