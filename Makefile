# Two commands for a fresh clone (Python 3.11 or newer + pip):
#   make demo   set up .venv and run the whole pipeline on phantom data (generated on first use into ~/.cache/boed)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-quick demo-policies study study-seeds study-power study-variability test test-slow bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/boed demo --out runs/demo --publish results

demo-quick: $(STAMP)
	$(BIN)/boed demo --quick --out runs/demo-quick

# the demo plus the amortised policies (distilled EIG-IPA, GDFS) as evaluated methods
demo-policies: $(STAMP)
	$(BIN)/boed demo --out runs/demo --with-policies --publish results

# does the completion model matter? EIG with IPA, IPA-R, an under-trained IPA, retrieval vs Uncond
study: $(STAMP)
	$(BIN)/boed study completers --n-test 60 --out runs/demo
	cp runs/demo/completers.csv runs/demo/completers.md runs/demo/completers.png results/

# training-seed robustness: one demo per seed, per-seed and pooled paired differences
study-seeds: $(STAMP)
	$(BIN)/boed study seeds --seeds 0,1,2 --out runs/seeds
	cp runs/seeds/seeds.csv runs/seeds/seeds.md runs/seeds/seeds.png results/

# where adaptivity pays: EIG-IPA vs Uncond on 1 000 test images per task, R = 7, the clairvoyant room, the capture
study-power: $(STAMP)
	$(BIN)/boed study power --out runs/demo
	cp runs/demo/power.csv runs/demo/power.md runs/demo/power.png results/

# the power study on phantom sets of growing variability: default (the power study's own row), realistic, hard;
# Effusion, 300 test images and R = 3 per level (the budget: each level trains its own VAE, IPA and AVP-CNN)
study-variability: study-power
	$(BIN)/boed study variability --levels default,realistic,hard --reuse default=runs/demo --illness effusion --n-test 300 --repeats 3 --out runs/variability
	cp runs/variability/variability.csv runs/variability/variability.md runs/variability/variability.png results/

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
