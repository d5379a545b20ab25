# The trainops images, one per kind of host (docs/deployment.md), both installed from requirements.lock
# (used as constraints: each image takes the locked version of what its extras need, and nothing more).
#   docker build --target control -t trainops:latest .   API, orchestrator, fleet workers, migrations
#   docker build --target gpu-host -t trainops:gpu .      per-host health agent and the trainer
# Both default to TRAINOPS_MODE=prod: dev mode (built-in admin token, embedded SQLite) is for a laptop, and an
# image is what gets deployed. The control image refuses to start without its secrets (docker/entrypoint.sh).
FROM python:3.11-slim AS source

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TRAINOPS_MODE=prod
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY health ./health
COPY migrations ./migrations
RUN useradd --create-home --uid 1000 trainops

# The control plane: no torch, tokenizers or NVML bindings (the base install), plus the Kubernetes
# adapter's client. An orchestrator that starts attempts itself (the local launcher) runs on a GPU host.
FROM source AS control
RUN pip install -c requirements.lock '.[kubernetes]'
COPY docker/entrypoint.sh /usr/local/bin/trainops-entrypoint
# Where the alertmanager-config service (docker-compose.yml) writes; a new volume mounted here takes this owner.
RUN install -d -o trainops -g trainops /etc/trainops-alertmanager
USER trainops
EXPOSE 8000
# The entrypoint checks the secrets (prod) or keeps the API on loopback (dev), and sets TRAINOPS_API_HOST;
# with the entrypoint replaced (docker run --entrypoint ...) the address falls back to loopback.
ENTRYPOINT ["/usr/local/bin/trainops-entrypoint"]
CMD ["sh", "-c", "exec uvicorn --factory service.main:create_app --host \"${TRAINOPS_API_HOST:-127.0.0.1}\" --port 8000"]

# A GPU host: the health agent (NVML bindings) and the trainer. torch is the lock's release from the
# package index, i.e. its CUDA build (the lock pins the release; the Makefile takes its CPU build locally).
FROM source AS gpu-host
RUN pip install -c requirements.lock '.[trainer,health]'
USER trainops
CMD ["python", "-m", "health.worker_main", "--help"]
