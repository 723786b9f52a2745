# Two entry points: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes in first, pinned, so that nothing that depends on it can pull a CUDA build on CPU machines.
TORCH  ?= torch==2.13.0
DEMO   := out/demo
# The trained demo avatar once it ships inside the package, else the random-weight `tiny` preset.
AVATAR ?= $(if $(wildcard engine/avatars/demo/config.json),demo,tiny)

.PHONY: install demo test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,train,eval,live,onnx]"
	touch $@

demo: install
	$(BIN)/avatar orbit --avatar $(AVATAR) --frames 96 --out $(DEMO)/orbit.json
	$(BIN)/avatar render --avatar $(AVATAR) --sequence $(DEMO)/orbit.json \
		--out $(DEMO)/orbit.mp4 --sheet $(DEMO)/orbit-sheet.png
	@echo "demo video: $(abspath $(DEMO)/orbit.mp4)"
	@echo "contact sheet: $(abspath $(DEMO)/orbit-sheet.png)"

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra --durations=15 tests

bench: install
	$(BIN)/avatar bench --avatar tiny --device cpu --steps 4,20

clean:
	rm -rf $(VENV) out .pytest_cache
