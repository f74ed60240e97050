# Sourced by the device scripts (augment_check.sh, gpu_check.sh) from the repository root: what they all need on a
# lent GPU machine without internet or pip index. Prints the machine, unpacks the carried Python 3.12 wheels
# (.device/wheelsA) onto PYTHONPATH, and keeps the Hugging Face hub and the progress bars quiet. $OUT must be set.
mkdir -p "$OUT"
python3 -V
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
unwheel() { python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$@"; }
[ -d /tmp/extA/diffusers ] || unwheel /tmp/extA .device/wheelsA/*.whl
export PYTHONPATH=/tmp/extA:$PWD HF_HUB_OFFLINE=1 DFKD_NO_PROGRESS=1
