#!/usr/bin/env bash
# Start the Image-to-Video app on Linux or WSL2: ./start_app.sh [--port N] [--model tiny] ... (--help lists all)
# This only finds Python 3.10+ and hands over to start_app.py, which does the real work.
# Works from any current directory, through a symlink, and from paths with spaces.
set -u

# The real folder of this script, following symlinks (readlink -f is not on every system).
src="${BASH_SOURCE[0]}"
while [ -L "$src" ]; do
    case "$src" in */*) link_dir="${src%/*}" ;; *) link_dir="." ;; esac
    link_dir="$(cd -P -- "$link_dir" && pwd)"
    src="$(readlink -- "$src")"
    case "$src" in /*) ;; *) src="$link_dir/$src" ;; esac
done
case "$src" in */*) here="${src%/*}" ;; *) here="." ;; esac
here="$(cd -P -- "$here" && pwd)"

python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1
}

# python3 first (an active venv or conda env puts its own first on PATH), then versioned names
# for systems whose python3 is older, then plain python.
py=""
for candidate in python3 python3.13 python3.12 python3.11 python3.10 python; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
        py="$candidate"
        break
    fi
done

if [ -z "$py" ]; then
    found=""
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then
            found="$("$candidate" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo unknown) at $(command -v "$candidate")"
            break
        fi
    done
    if [ -n "$found" ]; then
        echo "[ERROR] Python 3.10 or newer is needed; found only Python $found." >&2
    else
        echo "[ERROR] Python 3 was not found. / 未找到 Python 3。" >&2
    fi
    echo "        Debian, Ubuntu, WSL2: sudo apt install python3 python3-venv python3-pip" >&2
    echo "          (Ubuntu 20.04 and older: sudo apt install python3.10 python3.10-venv, from the deadsnakes PPA)" >&2
    echo "        Fedora: sudo dnf install python3    Arch: sudo pacman -S python" >&2
    echo "        Or Miniconda: https://docs.conda.io/en/latest/miniconda.html" >&2
    echo "        Then run ./start_app.sh again." >&2
    exit 10
fi

exec "$py" "$here/start_app.py" "$@"
