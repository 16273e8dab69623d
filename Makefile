# The README's two commands: `make demo` (the job on a toy world) and `make test`.
# Each sets up .venv on first use: the CPU build of torch first, then the package.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make TORCH_SPEC="torch --index-url <your CUDA wheel index>" or preinstall torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(VENV)/bin/ray-influence demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
