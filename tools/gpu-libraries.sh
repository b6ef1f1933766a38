# Sourced by tools/gpu-check.sh and tools/gpu-followup.sh before they configure (from the repository
# root): where the build finds cuDNN and NCCL on a GPU machine. The toolkit's or the system's, else the
# pip wheels' (the GPU machines have them so, next to PyTorch): CMake finds them through CUDNN_ROOT and
# NCCL_ROOT, and the libraries they load at run time through LD_LIBRARY_PATH.
# The folder of the pip package nvidia.<name> that holds include/<header>, by import or else under every
# site-packages folder (nvidia/ is a namespace package whose import can fail where its files are there).
wheel_folder() {
  python3 - "$1" "$2" 2>/dev/null <<'PY'
import glob, importlib, os, site, sys
name, header = sys.argv[1], sys.argv[2]
places = []
try:
    places += list(importlib.import_module("nvidia." + name).__path__)
except Exception:
    pass
for d in site.getsitepackages() + [site.getusersitepackages()]:
    places += glob.glob(os.path.join(d, "nvidia", name))
print(next((p for p in places if os.path.exists(os.path.join(p, "include", header))), ""))
PY
}
if [[ -z "${CUDNN_ROOT:-}" && ! -e /usr/local/cuda/include/cudnn.h ]]; then
  wheel=$(wheel_folder cudnn cudnn.h)
  if [[ -n "$wheel" ]]; then
    export CUDNN_ROOT="$wheel"
    # (the toolkit's lib64 too: cuDNN's runtime-compiled engines load NVRTC when they plan)
    export LD_LIBRARY_PATH="$wheel/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
if [[ -z "${NCCL_ROOT:-}" && ! -e /usr/local/cuda/include/nccl.h && ! -e /usr/include/nccl.h ]]; then
  wheel=$(wheel_folder nccl nccl.h)
  if [[ -n "$wheel" ]]; then
    export NCCL_ROOT="$wheel"
    export LD_LIBRARY_PATH="$wheel/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
