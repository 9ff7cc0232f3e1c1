// sma: version and build switches shared by every header.
#pragma once

#define SMA_VERSION_MAJOR 0
#define SMA_VERSION_MINOR 1
#define SMA_VERSION_PATCH 0
#define SMA_VERSION_STRING "0.1.0"

// Concepts are used when the translation unit is compiled as C++20; the C++17 path runs the same static_asserts.
#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
#define SMA_HAS_CONCEPTS 1
#else
#define SMA_HAS_CONCEPTS 0
#endif

#if __cplusplus < 201703L && !defined(_MSVC_LANG)
#error "sma requires C++17 or newer"
#endif

// Eigen's LGPL parts stay fenced off: the library is permissively licensed end to end.
#ifndef EIGEN_MPL2_ONLY
#define EIGEN_MPL2_ONLY
#endif
