# One image for the API and the worker. GPU hosts: build with TORCH_INDEX set to a CUDA wheel index.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml ./
COPY api ./api
COPY worker ./worker
COPY models ./models
COPY starvation ./starvation
COPY migrations ./migrations
COPY scripts ./scripts
COPY cli ./cli
COPY alembic.ini ./
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -e .
ENV GS_VAR_DIR=/data
