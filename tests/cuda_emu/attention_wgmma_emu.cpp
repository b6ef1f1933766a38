// kernels/cuda/attention_wgmma.cu compiled for the CPU emulation (emu.h, wgmma.cpp), its entry points in
// kraken::kernels_emu.
#define kernels kernels_emu
#include "kernels/cuda/attention_wgmma.cu"
