// kernels/cuda/softmax.cu compiled for the CPU emulation (emu.h), its entry points in kraken::kernels_emu.
#define kernels kernels_emu
#include "kernels/cuda/softmax.cu"
