#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs a job:
#   bash dev.sh demo   build MaCheX from an embedded miniature sample and print its stats
#   bash dev.sh test   run the test suite (what CI runs)
# Extra arguments go to the job (e.g. `bash dev.sh test -k chexpert -x`).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${MACHEX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  # Install torch before the project: an open-ended torch requirement resolved on its own can
  # pull a multi-GB CUDA build. Keep any torch already there (e.g. a user's CUDA build).
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0"
  fi
  python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi

job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec machex demo "$@" ;;
  # Tests run on every core (at most 4 workers); `-n 0` runs them in this process.
  test) exec python -m pytest -n auto --maxprocesses 4 "$@" ;;
  *) echo "usage: bash dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
