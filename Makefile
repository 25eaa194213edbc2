# The README's Quick start. `make demo` and `make test` install what is missing (Debian
# packages), build with CMake into build/, then run the demo or every test. CMake does the real
# work; this file only strings the steps together.

BUILD     ?= build
CMAKE_ARGS ?=
JOBS      ?= $(shell nproc)
PYTHON    := /usr/bin/python3

# Debian packages the build and the tests need.
DEPS := cmake make gcc pkg-config libuv1-dev libprotobuf-c-dev protobuf-c-compiler \
        libjansson-dev libxxhash-dev zlib1g-dev libdlpack-dev libinih-dev systemd valgrind \
        python3 python3-pytest python3-numpy python3-torch

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test demo coverage clean

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

# RELIABILITY P1: line coverage of the untrusted-input parsers by the unit tests and the fuzz
# corpora, in build-cov/ (gcov; a fault build, so the allocation sweeps count), failing under
# COVERAGE_MIN percent for any file of COVERAGE_GATE.
COVERAGE_MIN  ?= 90
COVERAGE_GATE := daemon/formats/fmt.c daemon/formats/index.c daemon/formats/manifest.c \
                 daemon/formats/pickle.c daemon/formats/safetensors.c daemon/formats/source.c \
                 daemon/formats/torch.c daemon/formats/zip.c daemon/formats/jscan.c \
                 proto/strhash.c proto/wire.c proto/fdpass.c
coverage: deps
	cmake -S . -B build-cov -DWSD_COVERAGE=ON -DWSD_FAULT_INJECTION=ON -DCMAKE_BUILD_TYPE=Debug
	cmake --build build-cov -j $(JOBS)
	find build-cov -name '*.gcda' -delete
	cd build-cov && ctest --output-on-failure -j $(JOBS) -L unit
	$(PYTHON) tests/coverage/report.py build-cov --min $(COVERAGE_MIN) --gate $(COVERAGE_GATE)

clean:
	rm -rf $(BUILD) build-cov
