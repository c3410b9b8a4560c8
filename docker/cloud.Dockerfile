# syntax=docker/dockerfile:1
# Stitch cloud: the pruned large VLM (PyTorch) behind gRPC, with health, reflection and /metrics.
#
#   docker build -f docker/cloud.Dockerfile -t stitch-cloud .     (from the repository root)
#
# PyPI's torch wheels for Linux x86_64 bring their own CUDA runtime, cuDNN and NCCL as nvidia-*
# wheels, so a slim Python base is enough; the GPU needs only the host's driver (NVIDIA Container
# Toolkit). TORCH_INDEX_URL picks another torch build, e.g. https://download.pytorch.org/whl/cu130.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY edge ./edge
COPY cloud ./cloud
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} ".[cloud]" \
    && rm -rf /src

COPY docker/health_probe.py /usr/local/bin/stitch-health-probe

RUN useradd --create-home --uid 10001 stitch \
    && mkdir -p /models
USER stitch
WORKDIR /home/stitch
VOLUME ["/models"]

# gRPC (stitch-cloud's default port) and Prometheus /metrics.
EXPOSE 50051 9464

# NOT_SERVING while the weights load: a large checkpoint gets start-period to become SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/stitch-health-probe", "--address", "127.0.0.1:50051"]

CMD ["stitch-cloud", "serve", "--model", "/models/cloud", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464"]
