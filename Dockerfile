# syntax=docker/dockerfile:1
# CPU image by default; `--build-arg VARIANT=cuda` for NVIDIA GPUs.
# `--build-arg BAKE_WEIGHTS=1` downloads the default model's weights into the image at
# build time (air-gapped sites); otherwise they download once into the /models volume.
# PYTHON_IMAGE and TORCH_INDEX_URL let sites without Docker Hub or PyTorch's index build
# the same file from a local base image and PyPI.
ARG PYTHON_IMAGE=python:3.11-slim
ARG VARIANT=cpu

# hadolint ignore=DL3006
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/models/cache
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /models && chown app:app /models
WORKDIR /srv

# torch first, its own layer: the biggest download changes least often.
FROM base AS torch-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements-torch.txt .
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r requirements-torch.txt

FROM base AS torch-cuda
COPY requirements-torch.txt .
RUN pip install --no-cache-dir -r requirements-torch.txt

# The project's dependencies, read from pyproject.toml (the same list `make install`
# installs), before the code, so code changes do not reinstall them.
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS runtime
WORKDIR /srv
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY app ./app
RUN pip install --no-cache-dir --no-deps .

ARG BAKE_WEIGHTS=0
RUN if [ "$BAKE_WEIGHTS" = "1" ]; then \
        python -c "from app.inference.weights import resolve_model_source as r; r('ViT-B-32', 'openai')" \
        && chown -R app:app /models; \
    fi

USER 10001
EXPOSE 8000
VOLUME ["/models"]
# /ready, not /health: the port answers while the model loads (/health 200 then), and
# "healthy" is what `depends_on: condition: service_healthy` waits for.
HEALTHCHECK --interval=15s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-m", "app.tools.healthcheck", "/ready"]
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
