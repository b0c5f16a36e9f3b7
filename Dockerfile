# The app and its GPU worker in one image (docs/scale-out.md): `serve` for the web UI, `worker --gpu 0` for a
# GPU worker. No model weights inside: mount a models volume at /app/models and fill it once with
#   docker compose run --rm worker-gpu0 download
# The image needs the NVIDIA Container Toolkit on the host (docker run --gpus ...) for its workers.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# torch's CUDA 12.8 build, to match the base image (a driver new enough for CUDA 12.8 is all the host needs).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    DO_NOT_TRACK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# torch first, in a layer of its own: the largest download, and it changes least often.
COPY pyproject.toml ./
RUN python -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
print(next(d for d in deps if re.match(r"torch\b", d)))' > /tmp/torch.txt \
    && pip install -r /tmp/torch.txt --index-url "$TORCH_INDEX_URL"

# The app itself, editable: it finds configs/ beside its package. The cluster extra brings Celery and redis-py.
COPY README.md ./
COPY app ./app
COPY configs ./configs
RUN pip install -e ".[cluster]" \
    && mkdir -p outputs logs models \
    && useradd --create-home --uid 1000 i2v \
    && chown -R i2v /app
USER i2v

VOLUME ["/app/models", "/app/outputs", "/app/logs"]
EXPOSE 7860
ENTRYPOINT ["python", "-m", "app"]
CMD ["serve", "--listen"]
