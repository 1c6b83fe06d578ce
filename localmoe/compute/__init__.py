"""Computing on quantized weights: the CPU kernels and the expert-execution plug-in point."""
