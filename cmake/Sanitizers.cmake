# WSD_SANITIZE=address,undefined (or thread) builds everything with that sanitizer, without
# recovery, so the first report fails the test that caused it.
set(WSD_SANITIZE "" CACHE STRING "Sanitizers to build with, e.g. address,undefined")
if(WSD_SANITIZE)
    add_compile_options(-fsanitize=${WSD_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
    add_link_options(-fsanitize=${WSD_SANITIZE})
endif()

# WSD_COVERAGE=ON instruments everything for gcov (tests/coverage/report.py reads the result;
# RELIABILITY P1 asks for line coverage of the parsers). -O0 so lines map one to one.
option(WSD_COVERAGE "Build with gcov instrumentation (--coverage -O0)" OFF)
if(WSD_COVERAGE)
    add_compile_options(--coverage -O0)
    add_link_options(--coverage)
endif()
