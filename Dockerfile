# hotlora: one image for the engine, the agents and `hotlora model init` (see compose.yaml).
#
#   docker build -t hotlora:cpu .                                  # CPU torch wheel (default)
#   docker build -t hotlora:gpu --build-arg TORCH_INDEX_URL= --build-arg HOTLORA_EXTRAS=vllm .   # CUDA torch + vLLM
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Extras to install with hotlora: "vllm" adds the vLLM sampler (--sampler vllm) to a GPU image.
ARG HOTLORA_EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned, from the index chosen above: a looser spec could pull a multi-GB CUDA build
# into the CPU image. An empty TORCH_INDEX_URL means pip's default index.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /opt/hotlora
COPY pyproject.toml README.md ./
COPY hotlora ./hotlora
COPY engine ./engine
COPY agents ./agents
COPY schemas ./schemas
RUN pip install ".${HOTLORA_EXTRAS:+[$HOTLORA_EXTRAS]}" && python -c "import torch, hotlora.engine; print('hotlora image: torch', torch.__version__)"

# A non-root user. /models and /checkpoints exist in the image and belong to it, so the named volumes
# that compose mounts there start out writable by it.
RUN useradd --create-home --uid 10001 hotlora \
    && mkdir -p /models /checkpoints /home/hotlora/.cache/hotlora \
    && chown -R hotlora:hotlora /models /checkpoints /home/hotlora/.cache
USER hotlora
WORKDIR /home/hotlora
ENV HOTLORA_CACHE=/home/hotlora/.cache/hotlora \
    HOTLORA_CHECKPOINT_DIR=/checkpoints

ENTRYPOINT ["hotlora"]
CMD ["--help"]
