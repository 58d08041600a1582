# scope-stream: the two set-up commands of the README are `make demo` and `make test`.
# Each creates .venv (if needed) and installs what it needs; both work on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.scope-stream-installed
PYTEST_ARGS ?=

.PHONY: demo test install lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel of torch first, so nothing pulls a multi-GB CUDA build.
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# Editable installs copy napari_plugin/ to scope_stream_napari; link it so edits take effect.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && test -n "$$site" && \
	  rm -rf "$$site/scope_stream_napari" && ln -s "$(CURDIR)/napari_plugin" "$$site/scope_stream_napari"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scope-stream demo --no-viewer

# The whole suite in one pytest process. The napari (Qt) tests need a display: pytest-xvfb (a test dependency)
# starts a virtual one itself when Xvfb is installed (.ci/run installs it); with neither a display nor Xvfb
# they are skipped with that reason (tests/conftest.py) instead of aborting the run. Exit code 5 (no tests
# collected, e.g. PYTEST_ARGS="-k nothing") is not a failure.
test: $(STAMP)
	@if [ "$$(uname -s)" = Linux ] && [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ] && ! command -v Xvfb >/dev/null 2>&1; then \
	  echo "note: no display and no Xvfb: the napari (Qt) tests will be skipped; install Xvfb to run them" \
	       "(Debian/Ubuntu: apt-get install xvfb xauth, or run .ci/run)"; fi
	@rc=0; $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/scope-stream bench

clean-venv:
	rm -rf $(VENV)
