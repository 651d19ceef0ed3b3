# The bulkdisconnect image. `make image` builds it as registry.example.com/bulkdisconnect:VERSION
# (VERSION from pyproject.toml); jobs/k8s/ runs it.
#
# Stage 1 builds the project's wheel with its own build backend (hatchling) and installs it,
# with its dependencies, into a virtualenv. Stage 2 copies only that virtualenv onto a clean
# base: no build tools, no wheel cache, and pip never runs in the final image.
#
# At run time nothing is written outside two places, so the root filesystem can be read-only:
#   /var/lib/bulkdisconnect  the working folder and HOME: state/<job>.sqlite and reports by
#                            default (a volume: the state must outlive the container)
#   /tmp                     TMPDIR: SQLite's temporary files (PRAGMA temp_store = FILE), about
#                            160 MB per million IDs planned (a tmpfs or emptyDir)
# e.g. docker run --read-only --tmpfs /tmp -v bulkdisconnect-state:/var/lib/bulkdisconnect \
#        -e STRIPE_API_KEY registry.example.com/bulkdisconnect:0.1.0 run --input ids.txt

# The same base in both stages: the virtualenv's python is a link to the base's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Must be pyproject.toml's version (`make image` passes it): the install below names the wheel
# by it, so a label that disagrees with the code fails the build.
ARG VERSION=0.1.0
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the context to these).
COPY pyproject.toml README.md ./
COPY bulkdisconnect/ bulkdisconnect/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
    && python -m venv --without-pip /opt/venv \
    && python -m pip --python /opt/venv/bin/python install --no-cache-dir \
        "/dist/bulkdisconnect-${VERSION}-py3-none-any.whl"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://git.example.com/bulkdisconnect
LABEL org.opencontainers.image.title="bulkdisconnect" \
      org.opencontainers.image.description="Disconnect Stripe Financial Connections accounts in bulk." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT"

# A fixed UID/GID, so the manifests can say runAsUser/runAsGroup/fsGroup 10001 and a volume's
# files keep one owner across image versions. No login shell, no home created here: the
# working folder below is its home.
RUN groupadd --gid 10001 bulkdisconnect \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/bulkdisconnect \
        --shell /usr/sbin/nologin bulkdisconnect \
    && install --directory --owner=10001 --group=10001 --mode=0700 /var/lib/bulkdisconnect

# Root-owned and read-only to the user that runs it; the .pyc files were compiled at install.
COPY --from=build /opt/venv /opt/venv

# PYTHONDONTWRITEBYTECODE: never try to write a .pyc next to the code (read-only anyway).
# TMPDIR: SQLite would otherwise try /var/tmp first, on the read-only root.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/bulkdisconnect \
    TMPDIR=/tmp

WORKDIR /var/lib/bulkdisconnect
VOLUME ["/var/lib/bulkdisconnect"]
USER 10001:10001

# Exec form: the tool is PID 1 and receives SIGTERM itself (exit 3 after draining).
ENTRYPOINT ["bulkdisconnect"]
CMD ["--help"]
