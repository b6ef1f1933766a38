// kernels/cuda/scratch.cu compiled for the CPU emulation (emu.h): the scratch buffers are host memory.
#define kernels kernels_emu
#include "kernels/cuda/scratch.cu"
