# One image for the API and the worker. GPU hosts: build with TORCH_INDEX set to a CUDA wheel index.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# libseccomp: the jail's syscall filter for foreign models; bubblewrap: the sandbox each one starts in
# (docs/security.md). Without bubblewrap no foreign model runs.
RUN apt-get update && apt-get install -y --no-install-recommends libseccomp2 bubblewrap && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY models ./models
COPY starvation ./starvation
COPY jail ./jail
COPY migrations ./migrations
COPY scripts ./scripts
COPY cli ./cli
COPY alembic.ini ./
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -e .
ENV GS_VAR_DIR=/data
