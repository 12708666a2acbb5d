#!/usr/bin/env bash
# Set up (or reuse) the virtual environment and link it as .venv.
#   bash scripts/setup.sh          the library, its command and every optional feature
#   bash scripts/setup.sh --test   also Debian's chromium, for the browser tests
# The environment lives outside the checkout, keyed by the hash of requirements.lock, so that
# every clone with the same lock file reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: $python is not Python 3.11 or newer, which requirements.lock needs (numpy, scipy);" \
       "set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ -d .venv ] && [ ! -L .venv ]; then
  echo "setup: .venv is a folder of its own, not this script's link; move it away first" >&2
  exit 2
fi
key=$(cat requirements.lock | sha256sum | cut -c1-16)
root=${PNEUMOSCAN_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/pneumoscan/venvs}
venv="$root/$key"

if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (once per lock file; a few minutes)"
  partial="$venv.partial.$$"  # this process's own: two setups at once do not share one
  trap 'rm -rf "$partial"' EXIT  # a failed or interrupted setup leaves nothing behind
  rm -rf "$partial"
  mkdir -p "$root"
  "$python" -m venv "$partial"
  "$partial/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock \
    2> >(grep -v "is ignored: it is neither" >&2)
  # venv scripts name their interpreter by absolute path: rewrite them for the final folder.
  grep -rlI --exclude-dir=__pycache__ "$partial" "$partial/bin" | xargs -r sed -i "s#$partial#$venv#g"
  touch "$partial/.complete"
  if [ -f "$venv/.complete" ]; then
    rm -rf "$partial"  # another setup finished first: use its environment
  else
    rm -rf "$venv"
    mv -T "$partial" "$venv" 2>/dev/null || rm -rf "$partial"  # -T: never into another's
  fi
  trap - EXIT
fi
# The project itself, editable, pointing at this checkout (quick: no dependencies resolved).
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
ln -sfn "$venv" .venv

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get update -qq >/dev/null && $apt_get install -y -qq chromium >/dev/null \
    || echo "warning: chromium could not be installed: the browser tests will be skipped"
fi
echo "ready: .venv -> $venv"
