# The trainops service image: control plane API, orchestrator, health workers (one image, several commands).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# The CPU torch wheel first, as the Makefile does, so `torch>=2.6` does not pull a multi-GB CUDA build;
# the GPU trainer image installs the CUDA build instead.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY health ./health
COPY migrations ./migrations
RUN pip install . && useradd --create-home --uid 1000 trainops

USER trainops
EXPOSE 8000
CMD ["uvicorn", "--factory", "service.main:create_app", "--host", "0.0.0.0", "--port", "8000"]
