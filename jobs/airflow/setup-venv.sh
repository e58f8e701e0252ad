#!/usr/bin/env bash
# Build .venv-airflow: Apache Airflow 3 in its own virtualenv, once per machine.
#
# Airflow pins many libraries (SQLAlchemy, pydantic, structlog, ...) that may clash with
# batchpipe's, so it never shares batchpipe's .venv. The DAG calls the `batchpipe` CLI by
# subprocess and never imports the package, so Airflow's interpreter doesn't need it.
# A stamp file records a finished install: a second run is a no-op, an interrupted one redoes
# the install. Usage: jobs/airflow/setup-venv.sh [VENV_DIR]   (default: .venv-airflow)
# Env: AIRFLOW_VERSION (default 3.1.*), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${1:-.venv-airflow}"
SPEC="apache-airflow==${AIRFLOW_VERSION:-3.1.*}"
stamp="$VENV/.installed-$(echo "$SPEC" | sha1sum | cut -c1-12)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
# Another process (a parallel test worker) may be building it: wait for its lock.
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
flock 9
if [[ -f "$stamp" ]]; then
  exit 0
fi
echo "== setting up $VENV with $SPEC (first run only, a few minutes)" >&2
start=$SECONDS
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q "$SPEC" >&2
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "== $VENV ready in $((SECONDS - start)) s" >&2
