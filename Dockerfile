# glowtrain on an official PyTorch CUDA runtime image: torch and torchvision come from the base,
# pip adds glowtrain and its small pure-Python dependencies.
#   docker build -t glowtrain .
#   docker run --gpus all -v $PWD/data:/data -v $PWD/runs:/runs glowtrain fit --config configs/celeba.yaml
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

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
