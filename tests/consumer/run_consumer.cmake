# CTest driver (label "consumer"): proves that a downstream project can use sma in both supported ways.
#   1. install this build tree into a fresh prefix, then configure + build + run tests/consumer with
#      find_package(sma CONFIG REQUIRED) through CMAKE_PREFIX_PATH;
#   2. configure + build + run tests/consumer with add_subdirectory(<sma source>).
# Inputs (-D): SMA_SOURCE_DIR, SMA_BINARY_DIR, WORK_DIR, GENERATOR, CXX_COMPILER, BUILD_TYPE, ENABLE_CUDA,
#              CUDA_ARCHITECTURES, CUDA_TARGET (optional: ON when this build has sma_cuda).
cmake_minimum_required(VERSION 3.25)

foreach(v SMA_SOURCE_DIR SMA_BINARY_DIR WORK_DIR GENERATOR CXX_COMPILER BUILD_TYPE)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run_consumer.cmake: -D${v}=... is required")
  endif()
endforeach()
if(NOT DEFINED ENABLE_CUDA)
  set(ENABLE_CUDA OFF)
endif()

function(step what)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "consumer: ${what}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer: ${what} failed (exit ${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

function(check_ran exe)
  step("run ${exe}" ${exe})
  if(NOT step_output MATCHES "consumer ok")
    message(FATAL_ERROR "consumer: ${exe} did not print 'consumer ok':\n${step_output}")
  endif()
  message(STATUS "consumer: ${step_output}")
endfunction()

set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(common -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
if(CUDA_ARCHITECTURES)
  list(APPEND common -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES})
endif()

# 1. installed package: the library's install component only (tools and examples may have rules of their own).
if(CUDA_TARGET)
  step("build sma_cuda" ${CMAKE_COMMAND} --build ${SMA_BINARY_DIR} --target sma_cuda)  # usually up to date
endif()
step("install" ${CMAKE_COMMAND} --install ${SMA_BINARY_DIR} --prefix ${prefix} --component sma)
foreach(f include/sma/core/layer.hpp)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "consumer: ${prefix}/${f} was not installed")
  endif()
endforeach()
file(GLOB_RECURSE config_files ${prefix}/*/smaConfig.cmake)
if(NOT config_files)
  message(FATAL_ERROR "consumer: no smaConfig.cmake under ${prefix}")
endif()
step("configure (find_package)" ${CMAKE_COMMAND} -S ${SMA_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/installed
  ${common} -DCMAKE_PREFIX_PATH=${prefix})
step("build (find_package)" ${CMAKE_COMMAND} --build ${WORK_DIR}/installed)
check_ran(${WORK_DIR}/installed/app)

# 2. source tree
step("configure (add_subdirectory)" ${CMAKE_COMMAND} -S ${SMA_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/subdir
  ${common} -DSMA_CONSUMER_SOURCE_DIR=${SMA_SOURCE_DIR} -DSMA_ENABLE_CUDA=${ENABLE_CUDA})
step("build (add_subdirectory)" ${CMAKE_COMMAND} --build ${WORK_DIR}/subdir)
check_ran(${WORK_DIR}/subdir/app)
