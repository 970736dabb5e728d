# Builds every Kernels/*.cu with nvcc where a CUDA toolkit is installed, for resource reports and SASS:
#   DSCUDA_DUMP_DIR=/tmp/dsc-tu ./DeepSeekCuda.Tests --filter "TestCategory=Nvrtc"   (writes the generated TUs)
#   cmake -DINSTANCES=/tmp/dsc-tu -P kernels.cmake                                    (output in build-kernels/)
# The families are templates: only the generated translation units (family + explicit instantiations of
# every specialization the launchers request, as NvrtcCompiler writes them) contain kernels.
# The engine itself compiles these sources at run time with NVRTC; this script is for inspection only:
# registers, shared memory and spills (-Xptxas -v) and the disassembly (cuobjdump -sass).
cmake_minimum_required(VERSION 3.20)

get_filename_component(ROOT "${CMAKE_CURRENT_LIST_DIR}" ABSOLUTE)
set(OUT "${ROOT}/build-kernels")
file(MAKE_DIRECTORY "${OUT}")
find_program(NVCC nvcc HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin REQUIRED)
find_program(CUOBJDUMP cuobjdump HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin REQUIRED)

# sm_90a through -gencode: the -arch=sm_90a shorthand also runs a plain sm_90 pass on some nvcc versions.
set(TARGETS "90a" "80")
file(GLOB FAMILIES "${ROOT}/Kernels/*.cu")
foreach(SRC ${FAMILIES})
  get_filename_component(NAME "${SRC}" NAME_WE)
  foreach(SM ${TARGETS})
    string(REPLACE "a" "" CC "${SM}")
    set(CUBIN "${OUT}/${NAME}.sm_${SM}.cubin")
    # The sm_90 compile test instantiates every specialization of the family in one TU.
    set(TU "${SRC}")
    if(DEFINED INSTANCES)
      file(GLOB GENERATED "${INSTANCES}/${NAME}.sm_90.*.cu")
      list(LENGTH GENERATED N)
      if(N GREATER 0)
        list(GET GENERATED 0 TU)
      else()
        message(WARNING "no generated TU for ${NAME} in ${INSTANCES}; compiling the bare family (no kernels)")
      endif()
    endif()
    execute_process(
      COMMAND "${NVCC}" -std=c++17 -cubin -gencode=arch=compute_${SM},code=sm_${SM} -Xptxas -v -lineinfo
              -I "${ROOT}/Kernels" -o "${CUBIN}" "${TU}"
      RESULT_VARIABLE RC OUTPUT_VARIABLE LOG ERROR_VARIABLE LOG)
    file(WRITE "${OUT}/${NAME}.sm_${SM}.ptxas.txt" "${LOG}")
    message(STATUS "${NAME} sm_${SM}:\n${LOG}")
    if(NOT RC EQUAL 0)
      message(FATAL_ERROR "nvcc failed for ${NAME} sm_${SM}")
    endif()
    execute_process(COMMAND "${CUOBJDUMP}" -sass "${CUBIN}" OUTPUT_FILE "${OUT}/${NAME}.sm_${SM}.sass")
  endforeach()
endforeach()
message(STATUS "resource reports and SASS in ${OUT}")
