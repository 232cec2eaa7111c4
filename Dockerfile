# CPU image by default. For NVIDIA GPUs build with a CUDA wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t cifar:cuda .
#   docker run --rm --gpus all -v "$PWD:/work" cifar:cuda train --device cuda
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MPLBACKEND=Agg

WORKDIR /opt/cifar
COPY pyproject.toml README.md ./
COPY cifar_cli ./cifar_cli
RUN pip install --index-url "$TORCH_INDEX_URL" "torch>=2.11" "torchvision>=0.26" \
 && pip install .

# Data, checkpoints and runs live in the mounted working folder.
WORKDIR /work
ENTRYPOINT ["cifar"]
CMD ["--help"]
