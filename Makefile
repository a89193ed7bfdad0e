VENV ?= .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast lint bench real-audio global-bundle clean

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

# real speech and music from Debian packages, split by speaker (apt-get download, about 380 MB; not needed by make test)
real-audio: $(VENV)/.installed
	$(VENV)/bin/fedsound data real-audio work/real-audio

# rebuild the global mouth-sound bundle fedsound ships (about 35 minutes on 2 cores); prints its manifest's sha256
global-bundle: real-audio
	$(VENV)/bin/fedsound bench global --real-audio work/real-audio --central --ship --workdir work \
		--out benchmarks/personalize/results/global.json

clean:
	rm -rf work .pytest_cache
