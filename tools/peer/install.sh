#!/bin/bash
# Install NVIDIA NeMo 2.5.3 (nemo.collections.llm, its HF <-> NeMo converters) with megatron-core 0.14.0
# into a CPU-only virtual environment, without Transformer Engine or Apex.
# usage: bash install.sh VENV_DIR        (about 2 minutes, about 2.4 GB; re-running it on a venv it made
#                                         only checks: pip finds everything installed)
# Then: VENV_DIR/bin/python nemo_import.py HF_DIR OUT_DIR ; VENV_DIR/bin/python nemo_export.py NEMO_DIR HF_OUT
# In hfnemo: `make test-peer` runs it for .venv-peer (copied from this workplace's /work/shared/peer).
# PEER_PYTHON picks the interpreter (default python3.11, else python3; NeMo 2.5.3 wants 3.10-3.12).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
V=${1:?usage: install.sh VENV_DIR}
PY=${PEER_PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -m venv "$V"
. "$V/bin/activate"
C="$HERE/constraints-nemo.txt"
pip install torch==2.13.0
pip install -c "$C" --no-deps nemo-toolkit==2.5.3 megatron-core==0.14.0 nvidia-modelopt==0.35.0
pip install -c "$C" "numpy<2" packaging lightning==2.4.0 hydra-core==1.3.2 omegaconf==2.3.0 fiddle cloudpickle \
    transformers==4.53.3 "huggingface_hub<1.0" safetensors sentencepiece tokenizers einops "tensorstore<0.1.72" \
    "zarr<3" ruamel.yaml wrapt torchmetrics webdataset tqdm python-dateutil wget text-unidecode scikit-learn rich \
    onnx==1.18.0 protobuf==5.29.6 nv_one_logger_core nv_one_logger_training_telemetry \
    nv_one_logger_pytorch_lightning_integration "datasets<4" "pandas<3" "pyarrow<21" nemo_run leptonai==0.27.3 \
    tiktoken psutil
pip install -c "$C" --no-deps ninja pulp nvidia-ml-py torchprofile
python "$HERE/patch_modelopt.py"
python - "$HERE" <<'PY'
import sys, torch
sys.path.insert(0, sys.argv[1])
import cpu_compat  # noqa: F401
from nemo.collections import llm
print("OK: nemo", __import__("nemo").__version__, "torch", torch.__version__)
PY
