# The image that cluster/k8s/*.yaml run (YOUR_REGISTRY/chatvec:0.1.0): Ray's GPU image with chatvec
# and vLLM installed, the sweep files in /app/examples and the cluster settings in /app/ray_config.yaml.
#
#   docker build -t YOUR_REGISTRY/chatvec:0.1.0 . && docker push YOUR_REGISTRY/chatvec:0.1.0
#
# The project's CI has no Docker engine or registry, so this file is not built there;
# tests/test_k8s_manifests.py checks it against the tree and the manifests instead.

# Ray must be the same everywhere: this base image, the pip pin below and rayVersion in the manifests.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION

# Pinned because they must match one another: vLLM 0.32.0 is built against torch 2.13.0, whose Linux
# wheels on PyPI are the CUDA 13 build (the GPU nodes need an NVIDIA driver that supports CUDA 13;
# torch brings its own CUDA libraries), and torchvision 0.28.0 is the one built for torch 2.13.0.
# Everything else keeps the ranges in pyproject.toml.
ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

# The base image runs as the unprivileged user `ray`; the install needs /app to be its own.
USER root
RUN mkdir -p /app && chown ray:users /app
USER ray
WORKDIR /app

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users chatvec/ chatvec/
COPY --chown=ray:users core/ core/
COPY --chown=ray:users merge/ merge/
COPY --chown=ray:users eval/ eval/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users runs/ runs/
COPY --chown=ray:users cli/ cli/
COPY --chown=ray:users demo/ demo/
RUN pip install --no-cache-dir \
        "ray[default]==${RAY_VERSION}" \
        "torch==${TORCH_VERSION}" \
        "torchvision==${TORCHVISION_VERSION}" \
        "vllm==${VLLM_VERSION}" \
        ".[vllm]" \
    && chatvec --version

# What the manifests' entrypoint names: chatvec nightly /app/examples/paper.yaml --config /app/ray_config.yaml
COPY --chown=ray:users examples/ examples/
COPY --chown=ray:users ray_config.yaml ./
