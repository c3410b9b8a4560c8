# syntax=docker/dockerfile:1
# Stitch edge: the small VLM on ONNX Runtime and the SEE gate, plus stitch-loadtest. No torch.
#
#   docker build -f docker/edge.Dockerfile -t stitch-edge .      (from the repository root)
#
# onnxruntime-gpu 1.31 loads CUDA 13 and cuDNN 9 from the system, which this base image
# provides; the CUDA EP needs only the host's driver (NVIDIA Container Toolkit). Without a GPU
# the runtime falls back to the CPU EP.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/stitch \
    PATH=/opt/stitch/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/stitch

# The distribution declares all three subpackages, so the cloud's sources are copied too; only
# the edge extra is installed, and the build fails if torch came in through any dependency.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY edge ./edge
COPY cloud ./cloud
RUN pip install ".[edge]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && rm -rf /src

COPY docker/health_probe.py /usr/local/bin/stitch-health-probe

RUN useradd --create-home --uid 10001 stitch \
    && mkdir -p /models /reports \
    && chown stitch:stitch /reports
USER stitch
WORKDIR /home/stitch
VOLUME ["/models"]

# A client answers no probes: its own health is whether its run finished.
HEALTHCHECK NONE

CMD ["stitch-loadtest", "--edge", "/models/edge", "--cloud", "cloud:50051", "--allow-remote", "cloud", "-n", "64", "--json-out", "/reports/loadtest.json", "--no-progress"]
