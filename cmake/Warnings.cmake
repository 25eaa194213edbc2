# Warning set for all project targets (after curl's PickyWarnings, trimmed to what gcc and clang
# both understand). wsd_warnings(target) applies it; WSD_WERROR turns warnings into errors.
set(WSD_WARNING_FLAGS
    -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wmissing-declarations
    -Wold-style-definition -Wpointer-arith -Wcast-qual -Wwrite-strings -Wformat=2 -Wundef -Wvla
    -Wimplicit-fallthrough -Wno-unused-parameter)

# clang (not gcc) flags every use of protobuf-c's generated *__INIT macros under -Wcast-qual:
# they cast its const empty string to char *. gcc builds keep the warning for our own code.
if(CMAKE_C_COMPILER_ID MATCHES "Clang")
    list(APPEND WSD_WARNING_FLAGS -Wno-cast-qual)
endif()

function(wsd_warnings target)
    target_compile_options(${target} PRIVATE ${WSD_WARNING_FLAGS})
    if(WSD_WERROR)
        target_compile_options(${target} PRIVATE -Werror)
    endif()
endfunction()
