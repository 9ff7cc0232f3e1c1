# Runs sma-golden over every *.safetensors in DIR; fails if the tool fails. With no folder it says so and passes
# (CI always has the folder; a checkout without ../shared should still be testable).
file(GLOB cases "${DIR}/*.safetensors")
if(NOT cases)
  message(WARNING "no golden cases in ${DIR}: skipped")
  return()
endif()
list(SORT cases)
execute_process(COMMAND ${TOOL} ${ARGS} ${cases} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "sma-golden failed (exit ${rc})")
endif()
