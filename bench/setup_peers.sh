#!/usr/bin/env bash
# Create the peers' virtual environments for the extraction benchmark (bench/run_bench.py):
#
#   bench/.venvs/reference          rotalabs-steer==1.2.0 (the pure-Python package we replace;
#                                   its import name is ours, so it only ever runs in its own process)
#   bench/.venvs/steering-vectors   steering-vectors==0.12.2
#   bench/.venvs/repeng             repeng==0.4.0 (ControlVector.train, method="pca_diff"; the
#                                   newest release on the package index: there is no 0.5)
#
# Each gets torch first, pinned to the CPU build this project is tested with (pip finds the
# local wheel; an unpinned torch would pull several GB of CUDA), then the same transformers as
# ours, so every system runs identical model code, then the peer and its own dependencies.
#
# steering-vectors 0.12.2 declares transformers<5, but its code runs unchanged on transformers
# 5.x (it only tokenizes, calls the model and hooks decoder blocks): it is installed with
# --no-deps next to transformers 5.24.0, and its declared needs (tqdm, scikit-learn) are
# installed by name. `pip check` in that venv therefore reports the transformers pin.
# repeng 0.4.0 also declares numpy<2.0, and needs it (it names np.float_, gone in NumPy 2):
# it is installed with --no-deps, then numpy 1.26 (torch 2.13 runs with it) and its other needs.
#
# Idempotent: a venv whose marker file records the same pins is left alone.
# Usage: bench/setup_peers.sh [PYTHON]     (PYTHON defaults to $PYTHON or python3)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-${PYTHON:-python3}}"
venvs="$here/.venvs"

TORCH="torch==2.13.0"
TRANSFORMERS="transformers==5.24.0"

# pip, without this machine's notes about index folders it skips (they are not errors).
pip_q() {
    local py="$1"; shift
    "$py" -m pip install --quiet "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

make_venv() {
    local name="$1"; shift
    local dir="$venvs/$name"
    local marker="$dir/.bench-installed"
    local pins="$TORCH $TRANSFORMERS $*"
    if [[ -f "$marker" && "$(cat "$marker")" == "$pins" ]]; then
        echo "bench peers: $name up to date ($dir)"
        return
    fi
    echo "bench peers: creating $name in $dir"
    rm -rf "$dir"
    "$python" -m venv "$dir"
    pip_q "$dir/bin/python" --upgrade pip
    pip_q "$dir/bin/python" "$TORCH"
    pip_q "$dir/bin/python" "$TRANSFORMERS" "numpy>=2.0"
    install_peer "$dir" "$@"
    "$dir/bin/python" - "$name" <<'EOF'
import sys, importlib.metadata as md
import torch, transformers
name = sys.argv[1]
peer = {"reference": "rotalabs-steer", "steering-vectors": "steering-vectors", "repeng": "repeng"}[name]
print(f"bench peers: {name}: {peer} {md.version(peer)}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
    echo "$pins" > "$marker"
}

install_peer() {
    local dir="$1"; shift
    case "$(basename "$dir")" in
        reference)
            # Its requirements (transformers>=4.35, torch>=2.0, ...) accept the pins above.
            pip_q "$dir/bin/python" "$@" "$TORCH" "$TRANSFORMERS" ;;
        steering-vectors)
            pip_q "$dir/bin/python" --no-deps "$@"
            pip_q "$dir/bin/python" "tqdm>=4.1,<5" "scikit-learn>=1.4,<2" ;;
        repeng)
            pip_q "$dir/bin/python" --no-deps "$@"
            pip_q "$dir/bin/python" "numpy>=1.26,<2" "tqdm>=4.66,<5" "scikit-learn>=1.4,<2" "gguf>=0.6" ;;
    esac
}

mkdir -p "$venvs"
make_venv reference "rotalabs-steer==1.2.0"
make_venv steering-vectors "steering-vectors==0.12.2"
make_venv repeng "repeng==0.4.0"
