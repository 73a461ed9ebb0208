# cycle-optuna worker (and dashboard) image with CPU-only PyTorch.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# CPU torch first, from PyTorch's CPU index, so `pip install .` keeps it instead of pulling CUDA wheels;
# docker-compose.gpu.yml passes a CUDA index instead
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0

COPY pyproject.toml README.md ./
COPY cycle_optuna ./cycle_optuna
RUN pip install .

COPY studies ./studies
RUN useradd --create-home --uid 1000 app && mkdir -p /artifacts && chown app /artifacts
USER app

# `docker compose` overrides the command; SIGTERM (docker stop) hands the running trial back for retry
ENTRYPOINT ["cycle-optuna"]
CMD ["worker", "studies/seed.toml"]
