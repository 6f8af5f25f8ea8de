// Argument-check macros whose messages are built without std::ostream.
//
// TORCH_CHECK_VALUE(cond, "x has ", n, " rows") formats its message with c10::str, i.e. an
// std::ostringstream instantiated in this library. On one GPU machine (Ubuntu 24.04, gcc 13,
// system Python 3.12, torch 2.11+cu130) the built extension carried its own copies of libstdc++'s
// number formatting (std::ostream::_M_insert<long> and friends, 24 symbols) and every such message
// segfaulted inside them instead of raising -- for the CPU and the CUDA ops alike. Locally
// (Debian 12, gcc 12) the same sources never define those symbols, so the root cause (toolchain or
// link flags of that machine) could not be pinned down here. Building the message as one
// std::string with std::to_string and appends takes the library's own code off that path
// entirely: c10::str of a single std::string returns it unchanged, and the exception object is
// built inside libc10.
//
// THD_CHECK_VALUE(cond, parts...) -> ValueError,  THD_CHECK_TYPE(cond, parts...) -> TypeError.
// Parts: C strings, std::string, c10::string_view, integers, doubles, at::ScalarType,
// c10::Device, at::IntArrayRef. They are only evaluated when the check fails.
#pragma once

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace thd {
namespace msg_detail {

inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
inline void put(std::string& s, I v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void put(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, at::IntArrayRef a) {
  s += '[';
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  s += ']';
}

}  // namespace msg_detail

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (msg_detail::put(s, parts), ...);
  return s;
}

}  // namespace thd

#define THD_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::thd::message(__VA_ARGS__))
#define THD_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::thd::message(__VA_ARGS__))
