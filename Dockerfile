# One image per service: docker build --build-arg EXTRAS=features -t klinebus-features .
# EXTRAS picks the pyproject extra, so each image installs only what its service needs.
FROM python:3.11-slim AS base
ARG EXTRAS=all
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    KLINEBUS_DATA_DIR=/var/lib/klinebus NUMBA_CACHE_DIR=/tmp/numba-cache MPLBACKEND=Agg
WORKDIR /app
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY data ./data
RUN pip install --no-cache-dir ".[${EXTRAS}]" \
    && useradd --system --uid 10001 klinebus && mkdir -p /var/lib/klinebus && chown klinebus /var/lib/klinebus
USER 10001
EXPOSE 9000
ENTRYPOINT ["klinebus"]
CMD ["--help"]
