VENV ?= .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fedsound demo --workdir work/demo

# the whole suite, the slow Ray and Ray Tune tests included (under 10 minutes on 2 cores)
test: $(VENV)/.installed
	$(PY) -m pytest -q

# everything but the tests marked slow (they start Ray or Ray Tune, or build a wheel)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# the quick benchmarks, figures into work/bench/ (bench personalize takes hours: run it by hand)
bench: $(VENV)/.installed
	for stage in prep train stream sim sweep; do \
		$(VENV)/bin/fedsound bench $$stage --workdir work --out work/bench/$$stage.json || exit 1; \
	done

clean:
	rm -rf work .pytest_cache
