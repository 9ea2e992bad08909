// Building blocks of the CPU kernels.
//
// * Element conversions to and from the opmath type written as plain bit operations, so that a
//   contiguous loop over bf16 data vectorises: load(bf16) widens the bits, store<bf16>(float)
//   rounds to nearest even with NaN -> 0x7FC0, bit-identical to c10::BFloat16(float). Other
//   types go through static_cast, as before.
// * Two builds of each op's kernels from one source: the op's <op>_cpu_kernels.h is included
//   twice by its <op>_cpu.cpp, once in namespace cpu_baseline (the compiler's default target) and
//   once between TMD_CPU_AVX2_BEGIN/END in namespace cpu_avx2 (x86-64 with GCC: AVX2 code for
//   the same loops). TMD_CPU_CALL picks the AVX2 build at run time when the CPU has AVX2 and
//   ATEN_CPU_CAPABILITY is not "default" (the switch torch's own kernels obey). FMA is left off,
//   so both builds round every operation the same way: the two give identical results.
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
#else
#define TMD_CPU_AVX2_BUILD 0
#endif

// Whether TMD_CPU_CALL runs the AVX2 build (decided once per process).
inline bool use_avx2() {
#if TMD_CPU_AVX2_BUILD
  static const bool use = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::string_view(cap) == "default") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return use;
#else
  return false;
#endif
}

}  // namespace tmd::cpu

// Calls `fn(args...)` of the AVX2 build (namespace cpu_avx2) or of the baseline (cpu_baseline).
#if TMD_CPU_AVX2_BUILD
#define TMD_CPU_CALL(fn, ...) \
  (::tmd::cpu::use_avx2() ? cpu_avx2::fn(__VA_ARGS__) : cpu_baseline::fn(__VA_ARGS__))
#else
#define TMD_CPU_CALL(fn, ...) cpu_baseline::fn(__VA_ARGS__)
#endif
