# Sourced by scripts/*: create .venv and install batchpipe with its dev extras when missing or stale.
# BATCHPIPE_VENV puts the virtualenv elsewhere: an absolute path as it is, a relative one
# relative to the repository (the scripts cd there before sourcing this).
VENV="${BATCHPIPE_VENV:-.venv}"
case "$VENV" in
  /*) ;;
  *) VENV="$PWD/$VENV" ;;
esac
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  echo "== setting up $VENV (first run only)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e '.[dev]' >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
