# klinebus service images: one Dockerfile, one image per service extra (README "Deploying").
#
#   docker build --build-arg EXTRAS=features -t klinebus-features .
#   buildah bud --format docker --layers --build-arg EXTRAS=features -t klinebus-features .
#   docker build --target cuda --build-arg EXTRAS=trainer -t klinebus-trainer-cuda .   # GPU overlay
#
# Stages: `requirements` (the pinned list for EXTRAS, from pyproject.toml) -> `builder` (compilers
# and a venv) -> `deps` (the dependencies, wheels built here: llama.cpp for vlm/trainer) -> `runtime`
# (the base image, the venv and the code; no compilers). Dependencies are installed before any code
# is copied, so a code change rebuilds only the last few small layers. `cuda-builder` -> `cuda`
# is the same on NVIDIA's CUDA images (llama.cpp built with CUDA, torch's CUDA wheels from PyPI).
#
# Build arguments:
#   BASE_IMAGE          the CPU base (default python:3.11-slim; CI passes an offline Debian bookworm
#                       + python3 base, scripts/images.py)
#   EXTRAS              pyproject extra(s), comma-separated: ingest (also archive), features, charts,
#                       inference, vlm, trainer, alerts, s3
#   BUILD_PACKAGES      Debian packages of the builder (compilers for source-only wheels)
#   RUNTIME_PACKAGES    Debian packages of the runtime (libgomp1: llama.cpp's OpenMP)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_CERT   a private index or mirror, or a
#                       TLS-inspecting proxy's CA (mount the file for the build: buildah bud -v
#                       ca.crt:/run/build-ca.crt:ro --build-arg PIP_CERT=/run/build-ca.crt). Build
#                       arguments reach only the builder's RUN steps, never the runtime image.
#   CUDA_DEVEL_IMAGE, CUDA_RUNTIME_IMAGE, CUDA_ARCHITECTURES   the cuda target

ARG BASE_IMAGE=python:3.11-slim
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# --- the pinned requirements of EXTRAS: a layer whose content changes only when they do -------------
FROM ${BASE_IMAGE} AS requirements
ARG EXTRAS=features
COPY scripts/image-requirements.py pyproject.toml /src/
RUN python3 /src/image-requirements.py /src/pyproject.toml "${EXTRAS}" > /requirements.txt

# --- builder: compilers and an empty venv -------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG BUILD_PACKAGES="build-essential cmake"
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
RUN if [ -n "${BUILD_PACKAGES}" ]; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${BUILD_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "setuptools>=77" wheel

# --- deps: every dependency of EXTRAS, before any code ------------------------------------------------
FROM builder AS deps
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && find /opt/venv -name '__pycache__' -path '*/tests/*' -prune -exec rm -rf {} + \
    && rm /tmp/requirements.txt

# --- cuda-builder: the same on NVIDIA's devel image (nvcc), llama.cpp built with CUDA -----------------
# Python is the CUDA image's own (Ubuntu 24.04: 3.12; klinebus needs >= 3.11). torch from PyPI is the
# CUDA build and brings its CUDA libraries as wheels.
FROM ${CUDA_DEVEL_IMAGE} AS cuda-builder
ARG BUILD_PACKAGES="build-essential cmake"
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check "setuptools>=77" wheel
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# --- cuda: the GPU overlay's image (trainer, vlm); run with the NVIDIA container runtime ---------------
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
ARG RUNTIME_PACKAGES="libgomp1"
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/home/klinebus \
    KLINEBUS_DATA_DIR=/var/lib/klinebus KLINEBUS_HTTP_PORT=9000 KLINEBUS_DEVICE=cuda \
    NUMBA_CACHE_DIR=/tmp/numba-cache MPLBACKEND=Agg
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates ${RUNTIME_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/klinebus --shell /usr/sbin/nologin klinebus \
    && mkdir -p /var/lib/klinebus && chown klinebus:klinebus /var/lib/klinebus
COPY --from=cuda-builder /opt/venv /opt/venv
COPY . /app
WORKDIR /app
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index --no-build-isolation -e . \
    && python3 -m compileall -q klinebus libs services
USER 10001:10001
EXPOSE 9000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KLINEBUS_HTTP_PORT', '9000'), timeout=4)"]
ENTRYPOINT ["klinebus"]
CMD ["--help"]

# --- runtime (the default target): the base image, the venv, the code; no compilers -------------------
FROM ${BASE_IMAGE} AS runtime
ARG RUNTIME_PACKAGES="libgomp1"
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/home/klinebus \
    KLINEBUS_DATA_DIR=/var/lib/klinebus KLINEBUS_HTTP_PORT=9000 \
    NUMBA_CACHE_DIR=/tmp/numba-cache MPLBACKEND=Agg
# A user with a home (the Hugging Face and matplotlib caches live under $HOME) and the data folder.
RUN if [ -n "${RUNTIME_PACKAGES}" ]; then \
        apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${RUNTIME_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; fi \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/klinebus --shell /usr/sbin/nologin klinebus \
    && mkdir -p /var/lib/klinebus && chown klinebus:klinebus /var/lib/klinebus
COPY --from=deps /opt/venv /opt/venv
# The build context is an allow-list (.dockerignore): every package the console script imports
# (klinebus, libs, services; tests/deploy/test_image_files.py checks it), the shipped candles
# (`klinebus simulate`, `klinebus demo`), pyproject.toml and README.md. One COPY, one layer.
# Installed editable: the code stays in /app, owned by root, read-only to the service user.
COPY . /app
WORKDIR /app
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index --no-build-isolation -e . \
    && python3 -m compileall -q klinebus libs services
USER 10001:10001
EXPOSE 9000
# Liveness as Kubernetes sees it (docker/podman; OCI-format images drop HEALTHCHECK, so build with
# --format docker under buildah). Kubernetes uses the Deployment's probes on the same /healthz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KLINEBUS_HTTP_PORT', '9000'), timeout=4)"]
ENTRYPOINT ["klinebus"]
CMD ["--help"]
