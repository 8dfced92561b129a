# syntax=docker/dockerfile:1
# Pictor server/indexer image: CPU torch by default; see docker-compose.yml.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto proto
COPY pictor pictor
COPY core core
COPY server server
COPY client client
COPY indexer indexer
COPY trainer trainer
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
# CPU wheels of torch; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
# The wheel by path: "pictor[server]" by name would let pip prefer an unrelated, higher-versioned
# "pictor" from PyPI.
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" "$(ls /wheels/pictor-*.whl)[server]" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 pictor \
    && mkdir -p /data && chown pictor /data
USER pictor
WORKDIR /data
ENV PICTOR_HOST=0.0.0.0 PICTOR_PORT=50051 PICTOR_INDEX=/data/index PICTOR_METRICS_PORT=9464
EXPOSE 50051 9464
# The shell form, to ask the port PICTOR_PORT names (`docker run -e PICTOR_PORT=6000`); the
# probe's Python start-up takes a second or more beside its 3 s answer time. The health Check,
# not Info: Info counts every label's items.
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD pictor health --target "127.0.0.1:${PICTOR_PORT:-50051}" --timeout 3
ENTRYPOINT ["pictor"]
CMD ["serve"]
