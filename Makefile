# The README's Quick start. `make demo` and `make test` install what is missing (Debian
# packages), build with CMake into build/, then run the demo or every test. CMake does the real
# work; this file only strings the steps together.

BUILD     ?= build
CMAKE_ARGS ?=
JOBS      ?= $(shell nproc)
PYTHON    := /usr/bin/python3

# Debian packages the build and the tests need.
DEPS := cmake make gcc pkg-config libuv1-dev libprotobuf-c-dev protobuf-c-compiler \
        libjansson-dev libxxhash-dev zlib1g-dev libdlpack-dev libinih-dev systemd python3 python3-pytest python3-numpy python3-torch

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test demo clean

all: build

deps:
	@missing=""; for p in $(DEPS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' \
	        || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    echo "Installing:$$missing"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	WSD_BUILD_DIR=$(abspath $(BUILD)) client/examples/demo.sh

clean:
	rm -rf $(BUILD)
