# The CUDA build of the stack for cluster nodes (docs/scaling.md). torch's and DALI's wheels
# bring their own CUDA runtime; the host needs the NVIDIA driver (and the container toolkit).
#   docker build -t icd-dist:latest .
FROM python:3.11-slim-bookworm

# A C compiler for Triton's launchers and torch.compile; rsync/openssh for the cluster
# launcher's file syncing.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ rsync openssh-client git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY icd_dist ./icd_dist
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" \
    && pip install --no-cache-dir .
COPY configs ./configs
COPY tools ./tools
COPY cluster ./cluster

ENV PYTHONUNBUFFERED=1
CMD ["bash"]
