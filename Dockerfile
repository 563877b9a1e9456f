# The node's container image (README "Install"): the CPU image by default,
#   docker build -t dicom-second-reader:0.1.0 .
# and the CUDA variant on an NVIDIA CUDA 12 runtime with cuDNN 9 (what onnxruntime-gpu 1.18+ needs):
#   docker build --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg ONNXRUNTIME=gpu -t dicom-second-reader:0.1.0-cuda .
# A machine without a registry passes a locally built base the same way (scripts/local-base-images
# makes stand-ins for python:3.11-slim-bookworm and debian:bookworm-slim).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
# cpu: onnxruntime; gpu: onnxruntime-gpu (never both: they install the same module)
ARG ONNXRUNTIME=cpu
# A base without Python 3.11+ (the CUDA images) gets its distribution's python3.
RUN if ! python3 -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ca-certificates python3 python3-venv >/dev/null && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /opt/reader
RUN python3 -m venv .venv && .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
# Dependencies first, in their own layer: a change of the node's code does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir reader && touch reader/__init__.py \
 && .venv/bin/python -m pip install -q --no-cache-dir ".[${ONNXRUNTIME}]" \
 && .venv/bin/python -m pip uninstall -q -y dicom-second-reader && rm -rf reader build
COPY reader/ reader/
COPY models/lung-lesion-unet/ models/lung-lesion-unet/
COPY deploy/reader.example.toml deploy/
# Editable: the package finds its bundled model beside it (reader.config.bundled_models_dir).
RUN .venv/bin/python -m pip install -q --no-cache-dir --no-deps -e . \
 && .venv/bin/python -m compileall -q reader

FROM ${BASE}
RUN if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 >/dev/null && rm -rf /var/lib/apt/lists/*; fi \
 && useradd --no-create-home --uid 10001 --user-group --home-dir /var/lib/reader --shell /usr/sbin/nologin reader \
 && install -d -o reader -g reader -m 0700 /var/lib/reader
COPY --from=build /opt/reader /opt/reader
ENV PATH=/opt/reader/.venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/reader
# Received instances, state and results: keep them on a volume (they survive a new container).
VOLUME /var/lib/reader
# DICOM (C-STORE, C-ECHO) and the node's HTTP server (health, metrics, STOW-RS).
EXPOSE 11112 8080
# Ready = model loaded, spool writable, disk above the watermark, DICOM listener up (/readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["reader"]
CMD ["serve", "--data-dir", "/var/lib/reader"]
