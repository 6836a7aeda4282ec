# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing (or older than the packaging files).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 is cached on our machines; an unpinned torch
# would pull a multi-gigabyte CUDA build. The library itself declares a range.
TORCH_PIN := torch==2.13.0

.PHONY: demo test bench clean

$(VENV): setup.cfg pyproject.toml
	@rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN) \
		|| { rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,examples]' \
		|| { rm -rf $(VENV); exit 1; }
	@touch $(VENV)

demo: $(VENV)
	$(PY) examples/registration_denoising.py

test: $(VENV)
	$(PY) -m pytest -q

bench: $(VENV)
	$(PY) benchmarks/jacobian.py
	$(PY) benchmarks/density.py --repeats 3 --markdown benchmarks/README.md

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .hypothesis *.egg-info
