// kernels/cuda/attention_mma.cu compiled for the CPU emulation (emu.h), its entry points in kraken::kernels_emu.
#define kernels kernels_emu
#include "kernels/cuda/attention_mma.cu"
