// Building blocks of the CPU kernels.
//
// * Element conversions to and from the opmath type written as plain bit operations, so that a
//   contiguous loop over bf16 data vectorises: load(bf16) widens the bits, store<bf16>(float)
//   rounds to nearest even with NaN -> 0x7FC0, bit-identical to c10::BFloat16(float). Other
//   types go through static_cast, as before.
// * Three builds of each op's kernels from one source: the op's <op>_cpu_kernels.h is included
//   three times by its <op>_cpu.cpp, in namespace cpu_baseline (the compiler's default target),
//   between TMD_CPU_AVX2_BEGIN/END in namespace cpu_avx2 and between TMD_CPU_AVX512_BEGIN/END in
//   namespace cpu_avx512 (x86-64 with GCC: AVX2 and AVX-512 code for the same loops). TMD_CPU_CALL
//   picks the widest the CPU has at run time, capped by ATEN_CPU_CAPABILITY ("default" / "avx2",
//   the switch torch's own kernels obey). AVX2 has no FMA and the AVX-512 build turns contraction
//   off (AVX-512F has FMA), so every build rounds every operation the same way: they give identical
//   results.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace tmd::cpu {

// The value in the opmath type (fp32 for bf16/fp16/fp32, fp64 for fp64).
template <typename T>
inline at::opmath_type<T> load(T v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<at::opmath_type<T>>(v);
  }
}

// `v` rounded to T (bf16: round to nearest even, NaN -> 0x7FC0, as c10::BFloat16(float)).
template <typename T, typename A>
inline T store(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TMD_CPU_AVX2_BUILD 1
#define TMD_CPU_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2\")")
#define TMD_CPU_AVX2_END _Pragma("GCC pop_options")
// AVX-512 (F, BW, VL, DQ: the set torch's own AVX512 kernels need), 512-bit vectors preferred, no FMA
// contraction (a fused a*b+c rounds once: results would differ from the other builds).
#define TMD_CPU_AVX512_BEGIN \
  _Pragma("GCC push_options")  \
  _Pragma("GCC target(\"avx2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512\")") \
  _Pragma("GCC optimize(\"fp-contract=off\")")
#define TMD_CPU_AVX512_END _Pragma("GCC pop_options")
#else
#define TMD_CPU_AVX2_BUILD 0
#endif

// The build TMD_CPU_CALL runs (decided once per process): 2 = AVX-512, 1 = AVX2, 0 = baseline. The
// widest the CPU has, capped by ATEN_CPU_CAPABILITY ("default", "avx2", "avx512"), as torch's own kernels.
inline int vector_level() {
#if TMD_CPU_AVX2_BUILD
  static const int level = [] {
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string_view cap = env == nullptr ? std::string_view() : std::string_view(env);
    if (cap == "default") return 0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") == 0) return 0;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return (avx512 && cap != "avx2") ? 2 : 1;
  }();
  return level;
#else
  return 0;
#endif
}

}  // namespace tmd::cpu

// Calls `fn(args...)` of the AVX-512 build (namespace cpu_avx512), the AVX2 build (cpu_avx2) or the
// baseline (cpu_baseline).
#if TMD_CPU_AVX2_BUILD
#define TMD_CPU_CALL(fn, ...)                                     \
  (::tmd::cpu::vector_level() == 2   ? cpu_avx512::fn(__VA_ARGS__) \
   : ::tmd::cpu::vector_level() == 1 ? cpu_avx2::fn(__VA_ARGS__)   \
                                     : cpu_baseline::fn(__VA_ARGS__))
#else
#define TMD_CPU_CALL(fn, ...) cpu_baseline::fn(__VA_ARGS__)
#endif
