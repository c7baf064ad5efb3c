# glowtrain on an official PyTorch CUDA "devel" image: it carries gcc and the CUDA toolkit, which
# torch.compile (Inductor, Triton) needs to build kernels; torch and torchvision come from the base,
# pip adds glowtrain and its small pure-Python dependencies.
#   docker build -t glowtrain .
#   docker build --build-arg TORCH=2.8.0 --build-arg CUDA=12.6 -t glowtrain:cu126 .   # older drivers
#   docker run --gpus all --ipc=host -v $PWD/data:/data -v $PWD/runs:/runs glowtrain fit --config configs/celeba.yaml
# The tag must exist on Docker Hub (pytorch/pytorch:<TORCH>-cuda<CUDA>-cudnn9-<FLAVOUR>); the CUDA
# version must not be newer than what the host's driver supports (nvidia-smi shows it).
ARG TORCH=2.8.0
ARG CUDA=12.8
# devel: with compilers. runtime: a smaller image in which train.compile=auto stays off.
ARG FLAVOUR=devel
ARG BASE_IMAGE=pytorch/pytorch:${TORCH}-cuda${CUDA}-cudnn9-${FLAVOUR}
FROM ${BASE_IMAGE}

# Compiled kernels are cached on the runs volume, so a second run (or a restart) skips recompiling.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCHINDUCTOR_CACHE_DIR=/runs/.cache/inductor \
    TRITON_CACHE_DIR=/runs/.cache/triton

WORKDIR /opt/glowtrain
COPY pyproject.toml README.md ./
COPY glowtrain ./glowtrain
RUN python -m pip install . && glowtrain --version

# A non-root user; data/ and runs/ in its workspace are the mounted volumes, so the shipped configs'
# relative paths (data/celeba, runs/<name>) land in /data and /runs.
RUN useradd --create-home --uid 1000 glow \
    && mkdir -p /data /runs /workspace \
    && ln -s /data /workspace/data && ln -s /runs /workspace/runs \
    && chown -R glow /data /runs /workspace
COPY --chown=glow configs /workspace/configs
USER glow
WORKDIR /workspace
VOLUME ["/data", "/runs"]
# TensorBoard: docker run -p 6006:6006 --entrypoint tensorboard glowtrain --logdir /runs --bind_all
EXPOSE 6006

ENTRYPOINT ["glowtrain"]
CMD ["--help"]
