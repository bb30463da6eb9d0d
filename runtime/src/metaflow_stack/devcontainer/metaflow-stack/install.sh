#!/bin/sh
# Installs Metaflow and the Metaflow Stack runtime into /opt/metaflow-stack.
# Options arrive as VERSION, PACKAGES, WHEELS and SYSTEMSITEPACKAGES (the
# Development Container features convention); the script runs as root at image
# build time.
set -eu

VENV=/opt/metaflow-stack
VERSION="${VERSION:-latest}"
PACKAGES="${PACKAGES:-}"
WHEELS="${WHEELS:-}"
SYSTEMSITEPACKAGES="${SYSTEMSITEPACKAGES:-false}"
HERE="$(cd "$(dirname "$0")" && pwd)"

python_ok() {
    command -v python3 >/dev/null 2>&1 \
        && python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

if ! python_ok; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "metaflow-stack feature: installing Python 3 with apt"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates
        rm -rf /var/lib/apt/lists/*
    fi
    python_ok || { echo "metaflow-stack feature: needs Python 3.11 or newer with venv (add the python feature first)" >&2; exit 1; }
fi

if [ "$SYSTEMSITEPACKAGES" = "true" ]; then
    echo "metaflow-stack feature: the environment sees $(command -v python3)'s packages"
    python3 -m venv --system-site-packages "$VENV"
else
    python3 -m venv "$VENV"
fi
if [ "$VERSION" = "latest" ]; then requirement=metaflow-stack; else requirement="metaflow-stack==$VERSION"; fi
if [ -n "$WHEELS" ]; then
    case "$WHEELS" in /*) wheels="$WHEELS" ;; *) wheels="$HERE/$WHEELS" ;; esac
    set -- --no-index --find-links "$wheels"
else
    set --
fi
# shellcheck disable=SC2086 # PACKAGES is a space-separated list of requirements
"$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check "$@" "$requirement" $PACKAGES
"$VENV/bin/python" -c "import metaflow, metaflow_stack; print('metaflow-stack feature: Metaflow', metaflow.__version__, 'runtime', metaflow_stack.__version__)"
