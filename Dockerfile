# The training image: CUDA PyTorch plus bagel-platform, run as a non-root user.
# Training pods run `python -m bagel.platform.launch.node -- train ...`; TensorBoard
# runs from the same image. Build from the repository root:
#   docker build -t ghcr.io/bagel-platform/bagel-train:0.1.0 .
# The base image carries the CUDA build of torch 2.13.0 that pyproject.toml pins
# (pip's ==2.13.0 matches its local version 2.13.0+cuXXX, so pip keeps it).
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/bagel
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY model/ model/
COPY platform/ platform/
COPY pipelines/ pipelines/
# Every pin except torch's, whose CPU wheel name would replace the base image's CUDA build.
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && python -m pip install --constraint /tmp/constraints.txt . \
    && rm /tmp/constraints.txt

# uid/gid 1000 match the pod securityContext of the chart and the job specs.
RUN groupadd --gid 1000 bagel && useradd --uid 1000 --gid 1000 --create-home bagel
USER 1000:1000
WORKDIR /home/bagel

ENTRYPOINT []
CMD ["bagel", "--help"]
