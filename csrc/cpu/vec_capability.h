// Selects ATen's vector specialisation from the compiler's target flags (setup.py builds
// with -march=native by default). ATen's own kernels get CPU_CAPABILITY from its build
// system; an extension must set it itself or at::vec falls back to scalar loops. The
// namespace name is ours so our inline functions never interpose with libtorch's.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY sparseft_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY sparseft_avx2
#else
#define CPU_CAPABILITY sparseft_default
#endif
#endif
