# latentflow in a container. CPU by default:
#   docker build -t latentflow .
#   docker run --rm -v "$PWD/runs:/app/runs" latentflow                 # python main.py
# CUDA: a CUDA runtime base and the matching torch wheels, then run with --gpus all:
#   docker build -t latentflow:cuda \
#     --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HOME=/cache/huggingface \
    LATENTFLOW_CACHE=/cache/latentflow \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The CUDA bases ship no Python; the python:* bases do.
# hadolint ignore=DL3008
RUN if ! command -v python3 > /dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && mkdir -p /cache && chmod 1777 /cache

WORKDIR /app
# torch and torchvision from the index matching the base (CPU or CUDA) first, so that
# requirements.txt finds them installed instead of pulling the default build.
COPY requirements.txt .
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" torch torchvision \
    && pip install -r requirements.txt

COPY . .
RUN pip install --no-deps .

# runs/ (checkpoints, figures, exports) and the latent cache belong outside the image.
VOLUME ["/app/runs", "/cache"]
CMD ["python", "main.py"]
