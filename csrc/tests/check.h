// The assertion the C++ unit tests share: a failed CHECK prints its location, condition and a
// printf-style message, counts into `failures`, and the test goes on (main returns failures != 0).
#pragma once
#include <cstdio>

static int failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s  ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
