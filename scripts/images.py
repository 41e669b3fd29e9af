#!/usr/bin/env python3
"""Build klinebus service images with Debian's buildah, offline-friendly (used by `make images` and
tests/deploy/test_image.py).

    python3 scripts/images.py base                 # the offline base image; prints its name
    python3 scripts/images.py build features       # one service image (klinebus-features:dev)
    python3 scripts/images.py build --all          # every service image (slow: llama.cpp, torch)

No registry of base images is needed: without BASE_IMAGE in the environment the base is made here,
``debootstrap`` of Debian bookworm (the release python:3.11-slim is built on; its python3 is 3.11)
from the Debian mirror apt already uses (read from /etc/apt/sources.list*), with python3,
python3-venv and python3-pip, committed with ``buildah from scratch``. It is kept in buildah's
storage and as a tarball under CACHE (default /var/cache/klinebus-ci), so only the first run pays.
With BASE_IMAGE set (e.g. docker.io/library/python:3.11-slim where a registry is reachable) that
image is used as is.

pip inside the build reaches the index the way pip on this host does: PIP_INDEX_URL,
PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST from the environment or from `pip config` (only http(s)
indexes: file:// ones do not exist inside the build) become build arguments, and pip's CA bundle
(PIP_CERT / `pip config` cert, for a TLS-inspecting proxy) is mounted into the RUN steps; no host
is written here.

Needs root (buildah --isolation chroot; storage driver overlay where the kernel mounts it, else vfs).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KLINEBUS_CI_CACHE", "/var/cache/klinebus-ci"))
SUITE = "bookworm"
BASE_NAME = f"localhost/klinebus-ci-base:{SUITE}"
BUILD_CA = "/run/klinebus-build-ca.crt"
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates", "passwd"]
# service -> pyproject extra (archive ships with ingest)
EXTRAS = {
    "ingest": "ingest", "archive": "ingest", "features": "features", "charts": "charts",
    "inference": "inference", "vlm": "vlm", "trainer": "trainer", "alerts": "alerts",
}
# one image per extra: archive runs from the ingest image
IMAGES = {"ingest": "ingest", "features": "features", "charts": "charts", "inference": "inference",
          "vlm": "vlm", "trainer": "trainer", "alerts": "alerts"}


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def storage_driver() -> str:
    """overlay where this kernel lets us mount it (a layer costs its changes), else vfs (every layer
    is a full copy of the file system: tens of GB written per build). KLINEBUS_BUILDAH_DRIVER overrides."""
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = os.environ.get("KLINEBUS_BUILDAH_DRIVER") or ("overlay" if _overlay_mounts() else "vfs")
    return _DRIVER


_DRIVER: str | None = None


def _overlay_mounts() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        d = {n: Path(tmp) / n for n in ("lower", "upper", "work", "merged")}
        for p in d.values():
            p.mkdir()
        opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"
        ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(d["merged"])],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(d["merged"])], capture_output=True)
        return ok


def buildah_cmd() -> list[str]:
    driver = storage_driver()
    return ["buildah", "--root", str(CACHE / f"storage-{driver}"), "--runroot", str(CACHE / f"run-{driver}"),
            "--storage-driver", driver]


def missing_tools() -> str | None:
    """Why images cannot be built here (one line), or None."""
    if os.geteuid() != 0:
        return "not root (buildah --storage-driver vfs --isolation chroot needs root here)"
    for tool in ("buildah", "debootstrap"):
        if not shutil.which(tool) and not (tool == "debootstrap" and os.environ.get("BASE_IMAGE")):
            return f"no {tool} on PATH (scripts/system-deps.sh installs it)"
    return None


@contextlib.contextmanager
def locked():
    """One builder at a time per cache (make images and the test may overlap)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def debian_mirror() -> str:
    """The Debian archive URI apt already uses for bookworm (first match in sources.list*)."""
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*.list")) \
        + sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line.startswith(" "):
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.split()
                if ("deb" in fields.get("types", []) and SUITE in fields.get("suites", [])
                        and fields.get("enabled", ["yes"])[0] != "no" and "main" in fields.get("components", [])):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(parts) >= 4 and parts[0] == "deb" and parts[2] == SUITE and "main" in parts[3:]:
                    return parts[1]
    raise SystemExit(f"images: no 'deb ... {SUITE} main' source in /etc/apt/sources.list*: set BASE_IMAGE instead")


def pip_build_args() -> list[str]:
    """PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST as this host's pip sees them (http(s) only)."""
    config: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=30).stdout
        for line in out.splitlines():
            m = re.match(r"^[^.]+\.([a-z-]+)='(.*)'$", line.strip())
            if m:
                config.setdefault(m.group(1), m.group(2))
    args = []
    for var, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                     ("PIP_TRUSTED_HOST", "trusted-host")):
        value = os.environ.get(var) or config.get(key, "")
        if var != "PIP_TRUSTED_HOST":
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            args += ["--build-arg", f"{var}={value}"]
    # A TLS-inspecting proxy's CA: mounted for the RUN steps only, never copied into a layer.
    cert = os.environ.get("PIP_CERT") or config.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE")
    if cert and Path(cert).is_file():
        args += ["--volume", f"{Path(cert).resolve()}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]
    return args


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def has_image(name: str) -> bool:
    return subprocess.run(buildah_cmd() + ["inspect", "--type", "image", name], capture_output=True).returncode == 0


def ensure_base() -> str:
    """BASE_IMAGE if set, else the offline Debian bookworm + python3 base (made once, then cached)."""
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    with locked():
        if has_image(BASE_NAME):
            return BASE_NAME
        tarball = CACHE / f"{SUITE}-python3.tar"
        if not tarball.exists():
            mirror = debian_mirror()
            log(f"debootstrap {SUITE} from {mirror} (once; cached in {tarball})")
            started = time.monotonic()
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                root = Path(tmp) / "rootfs"
                (CACHE / "debs").mkdir(exist_ok=True)
                run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                     f"--cache-dir={CACHE / 'debs'}", SUITE, str(root), mirror], stdout=subprocess.DEVNULL)
                run(["chroot", str(root), "apt-get", "clean"])
                shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
                (root / "var/lib/apt/lists/partial").mkdir(parents=True)
                run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball) + ".part", "."])
                os.replace(str(tarball) + ".part", tarball)
            log(f"debootstrap took {time.monotonic() - started:.0f}s")
        b = buildah_cmd()
        ctr = run(b + ["from", "scratch"], capture_output=True, text=True).stdout.strip()
        try:
            run(b + ["add", ctr, str(tarball), "/"], stdout=subprocess.DEVNULL)
            run(b + ["config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "--env", "LANG=C.UTF-8", "--cmd", "python3", "--os", "linux", "--arch", "amd64", ctr])
            run(b + ["commit", "--rm", ctr, BASE_NAME], stdout=subprocess.DEVNULL)
        except BaseException:
            subprocess.run(b + ["rm", ctr], capture_output=True)
            raise
        return BASE_NAME


def build(service: str, *, tag: str | None = None, target: str | None = None, extra_args: list[str] = ()) -> str:
    """buildah bud of the Dockerfile for one service's extra; returns the image name."""
    extra = EXTRAS[service]
    tag = tag or f"localhost/klinebus-{extra}:dev"
    base = ensure_base()
    cmd = buildah_cmd() + [
        "bud", "--isolation", "chroot", "--layers", "--format", "docker", "--network", "host",
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"EXTRAS={extra}", *pip_build_args(),
        *(["--target", target] if target else []), *extra_args, "-t", tag, "-f", str(REPO / "Dockerfile"), str(REPO),
    ]
    with locked():
        started = time.monotonic()
        run(cmd)
        log(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base", help="make (or find) the base image and print its name")
    bp = sub.add_parser("build", help="build service images")
    bp.add_argument("services", nargs="*", metavar="SERVICE", help=", ".join(EXTRAS))
    bp.add_argument("--all", action="store_true", help="every service image")
    args = p.parse_args(argv)
    why = missing_tools()
    if why:
        print(f"images: cannot build here: {why}", file=sys.stderr)
        return 2
    if args.cmd == "base":
        print(ensure_base())
        return 0
    services = list(IMAGES) if args.all else args.services
    if not services:
        p.error("name a service or pass --all")
    unknown = [s for s in services if s not in EXTRAS]
    if unknown:
        p.error(f"unknown service {unknown[0]!r}: one of {', '.join(EXTRAS)}")
    for s in services:
        print(build(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
