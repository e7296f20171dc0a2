# Two commands on a fresh machine: `make run` and `make test` (both create .venv and install on first use).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-crt-bench
ARGS ?=

.PHONY: install run test test-slow lint leaderboard leaderboard-table catalog compare reference report bench world world-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the whole pipeline on the miniature world (pass overrides as ARGS="crt=... attack=...")
	$(PY) run.py $(ARGS)

test: $(STAMP)  ## fast suite (slow tests excluded by pyproject addopts); "no tests collected" is a failure
	@$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

options = $(shell ls conf/$(1)/*.yaml | sed 's|.*/||; s|\.yaml$$||' | paste -sd, -)
WORLD_CONCEPTS := $(shell ls conf/concept/world_*.yaml | sed 's|.*/||; s|\.yaml$$||' | paste -sd, -)
CRTS ?= $(call options,crt)
ATTACKS ?= $(call options,attack)
# Adaptive variants run against the filters (the CRTs whose family is `filter`, read from the plug-ins); an attack
# without one is refused in one line and the sweep goes on.
ADAPTIVE_ATTACKS ?= $(ATTACKS)
FILTER_CRTS ?= $(shell $(PY) -m runners.catalog --names crt --family filter)
CONCEPTS ?= $(WORLD_CONCEPTS)
leaderboard: $(STAMP)  ## every world concept x CRT x attack (resumable; committed run keys are skipped), then the tables
	$(PY) run.py -m concept=$(CONCEPTS) crt=$(CRTS) attack=$(ATTACKS) \
		progress=false results.leaderboard=false
	$(PY) run.py -m concept=$(CONCEPTS) crt=$(FILTER_CRTS) attack=$(ADAPTIVE_ATTACKS) attack.adaptive=true \
		progress=false results.leaderboard=false
	$(PY) -m runners.leaderboard results
	$(PY) -m runners.claims results > /dev/null
	$(PY) -m runners.readme_tables

leaderboard-table: $(STAMP)  ## only rebuild results/leaderboard.md, .csv, leaderboard_long.csv and plots/ from results/runs/*.json
	$(PY) -m runners.leaderboard results

catalog: $(STAMP)  ## plug-ins with their access and defaults, and the CRT x attack compatibility matrix
	$(PY) -m runners.catalog

report: $(STAMP)  ## results/report/: one HTML page per concept (tables, plots, image grids); ARGS="report.unsafe_images=hide"
	$(PY) -m runners.report results $(ARGS)

bench: $(STAMP)  ## paired speed ratios on the miniature world -> results/bench.md (~11 min on 2 busy cores; ARGS="--quick" or sizes)
	OMP_NUM_THREADS=1 $(PY) -m runners.bench $(ARGS)

compare: $(STAMP)  ## line results/runs up with the published numbers: agrees / disagrees / not comparable (why)
	$(PY) -m runners.compare results

reference: $(STAMP)  ## rewrite results/paper_reference.csv and .md from runners/paper_reference.py
	$(PY) -m runners.compare --write-reference

world: $(STAMP)  ## retrain the miniature world (hours on 2 cores; resumable)
	PYTHON=$(PY) bash world/train_all.sh

world-check: $(STAMP)
	$(PY) -m world.check
