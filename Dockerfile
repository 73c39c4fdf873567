# lookalike images (README "Production"). Three targets, one slim Python 3.11 base:
#
#   api         CPU-only: FastAPI + uvicorn. The API embeds uploads and queries on the CPU (one
#               image at a time is cheap; batching does the rest), so it carries torch's CPU
#               wheel from the PyTorch CPU index and no CUDA libraries (~1 GB instead of ~6 GB).
#   worker-cpu  the same environment running the `cpu` queue (index, import, dataset jobs).
#   worker-gpu  the `gpu` queue (train, evaluate). Its CUDA runtime comes from the PyTorch CUDA
#               wheels (nvidia-cuda-runtime, cuDNN, cuBLAS, NCCL as pip packages, as in the tested
#               virtual environment) rather than an nvidia/cuda base image: the base image would
#               only duplicate those libraries and bring another Python. The host provides the
#               driver through the NVIDIA Container Toolkit (driver >= 580 for the default cu130
#               wheel; build with TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu126 for
#               older drivers).
#
# Dependencies are installed with `-c constraints.txt` (the versions the tests passed with;
# regenerate with `make constraints`) in a builder stage; the final stages copy the virtual
# environment and the source only, and run as the unprivileged user `lookalike` (uid 10001).
#
#   docker build --target api -t lookalike:api .
#   docker build --target worker-gpu -t lookalike:worker-gpu .
#
# Build arguments (docker-compose.yml passes them from the environment or .env):
#   PYTHON_IMAGE          the base: any Debian 12 image with Python 3.11 and venv (default the
#                         official slim image; deploy/local-images/build.sh makes one from
#                         Debian packages where no registry is reachable)
#   TORCH_CPU_INDEX       where the API image's CPU-only torch comes from; empty = from PyPI or
#                         the wheelhouse (the CUDA build: works on the CPU, ~5 GB larger)
#   PIP_INSTALL_OPTIONS   extra pip options: `--no-index` for an air-gapped build from the
#                         wheelhouse alone, `--index-url URL` for a mirror
# The wheelhouse: wheels in ./wheelhouse (`make wheelhouse` fills it) are offered to pip before
# any index; empty by default. No `# syntax=` line: BuildKit would fetch that frontend image from
# Docker Hub, which an air-gapped build cannot reach; the built-in frontend suffices.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /srv/lookalike
COPY pyproject.toml constraints.txt ./
COPY wheelhouse /wheelhouse
ENV PIP_FIND_LINKS=/wheelhouse
ARG PIP_INSTALL_OPTIONS=""
# The project's runtime requirements, read from pyproject.toml, plus those of the extras named
# in EXTRAS (comma-separated, e.g. `milvus`: docker-compose.milvus.yml sets it): this layer (the
# slow one) only changes with pyproject.toml, constraints.txt or EXTRAS, not with the source.
ARG EXTRAS=""
RUN python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = p['dependencies'] + [d for e in sys.argv[1].split(',') if e for d in p['optional-dependencies'][e]]; open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" "${EXTRAS}"

FROM builder AS build-cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# With the CPU index added, pip prefers torch 2.x.y+cpu (a local version sorts above the plain
# one) and `torch==2.x.y` in the constraints accepts it; no nvidia-* package is pulled in.
RUN pip install ${PIP_INSTALL_OPTIONS} ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} \
        -c constraints.txt -r /tmp/requirements.txt \
    && if [ -n "${TORCH_CPU_INDEX}" ]; then ! pip list 2>/dev/null | grep -q '^nvidia-'; \
       else echo "note: torch without TORCH_CPU_INDEX is the CUDA build (larger image)"; fi
COPY alembic.ini README.md ./
COPY alembic ./alembic
COPY training ./training
COPY app ./app
RUN pip install ${PIP_INSTALL_OPTIONS} --no-deps -e . && python -c "import app.cli, app.main, app.worker.celery_app"

FROM builder AS build-gpu
ARG TORCH_CUDA_INDEX=
RUN pip install ${PIP_INSTALL_OPTIONS} ${TORCH_CUDA_INDEX:+--extra-index-url "$TORCH_CUDA_INDEX"} \
        -c constraints.txt -r /tmp/requirements.txt
COPY alembic.ini README.md ./
COPY alembic ./alembic
COPY training ./training
COPY app ./app
RUN pip install ${PIP_INSTALL_OPTIONS} --no-deps -e . && python -c "import app.cli, app.worker.celery_app"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# libcairo2: the IconThemes builder renders SVG icons (dataset jobs); libgomp1: OpenMP for FAISS.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libcairo2 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lookalike \
    && useradd --system --uid 10001 --gid lookalike --home-dir /home/lookalike --create-home \
        --shell /usr/sbin/nologin lookalike \
    && mkdir -p /data /datasets \
    && chown lookalike:lookalike /data
# /data is the shared volume (uploads, FAISS snapshots, models, job folders); a fresh named
# volume takes over the ownership set here. The home folder is writable for the caches that
# libraries keep there (matplotlib, ONNX Runtime, torch hub); /srv/lookalike (code) is not.
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 LOOKALIKE_DATA_DIR=/data
WORKDIR /srv/lookalike

FROM runtime AS cpu-runtime
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /srv/lookalike /srv/lookalike

FROM cpu-runtime AS worker-cpu
USER lookalike
HEALTHCHECK --interval=30s --timeout=20s --start-period=30s --retries=3 \
    CMD celery -A app.worker.celery_app:celery_app inspect ping --destination "cpu@$HOSTNAME" --timeout 10 \
        > /dev/null || exit 1
CMD ["lookalike", "worker", "--queues", "cpu", "--concurrency", "1", "--pool", "solo"]

FROM runtime AS worker-gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /srv/lookalike /srv/lookalike
# What the NVIDIA Container Toolkit reads (an nvidia/cuda base image would set the same).
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LOOKALIKE_WORKER_DEVICE=cuda
USER lookalike
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A app.worker.celery_app:celery_app inspect ping --destination "gpu@$HOSTNAME" --timeout 10 \
        > /dev/null || exit 1
CMD ["lookalike", "worker", "--queues", "gpu", "--concurrency", "1", "--pool", "solo"]

# The default target (last): `docker build .` gives the API image.
FROM cpu-runtime AS api
USER lookalike
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" \
        || exit 1
CMD ["sh", "-c", "python -m app.prestart --wait 120 && exec uvicorn app.main:create_app --factory --host 0.0.0.0 --port 8000 --proxy-headers"]
