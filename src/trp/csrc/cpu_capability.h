// CPU kernels built for several instruction sets and chosen at load time, as ATen's
// CPU_CAPABILITY does.
//
// setup.py compiles every kernel unit `csrc/<op>/<unit>_cpu.cpp` once per capability (DEFAULT:
// the x86-64 baseline; AVX2: -mavx2 -mfma; AVX512: -mavx512f/bw/vl/dq), each with
// -DTRP_CPU_CAPABILITY=<name> (and ATen's CPU_CAPABILITY / CPU_CAPABILITY_<name>, which select
// at::vec::Vectorized's specialisations), so all of a unit's code lands in the namespace
// trp::<name> (see common.h). A unit therefore never registers its kernels itself; it ends with
//
//   TRP_CPU_KERNELS(<unit>, m) {
//     m.impl("<op>", &trp::<op>::<op>_cpu);
//   }
//
// which defines trp::<name>::register_<unit>_cpu(torch::Library&). cpu_dispatch.cpp, compiled for
// the baseline only (as ops.cpp), calls the registrations of one capability from its
// TORCH_LIBRARY_IMPL(trp, CPU, m): the best one this CPU runs, never above ATen's own choice
// (ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers it). A unit must have no static initialisers of
// its own (they would run AVX-512 code at load on any CPU), hence no TORCH_LIBRARY_IMPL in it.
#pragma once

#include <torch/library.h>

#ifndef TRP_CPU_CAPABILITY
#define TRP_CPU_CAPABILITY DEFAULT
#endif

#define TRP_CPU_KERNELS(unit, m)                                    \
  namespace trp {                                                   \
  inline namespace TRP_CPU_CAPABILITY {                             \
  void register_##unit##_cpu(torch::Library& library);              \
  }                                                                 \
  }                                                                 \
  void trp::TRP_CPU_CAPABILITY::register_##unit##_cpu(torch::Library& m)
