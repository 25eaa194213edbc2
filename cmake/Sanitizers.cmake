# WSD_SANITIZE=address,undefined (or thread) builds everything with that sanitizer, without
# recovery, so the first report fails the test that caused it.
set(WSD_SANITIZE "" CACHE STRING "Sanitizers to build with, e.g. address,undefined")
if(WSD_SANITIZE)
    add_compile_options(-fsanitize=${WSD_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer)
    add_link_options(-fsanitize=${WSD_SANITIZE})
endif()
