# make demo : set up the venv (core package only), build the synthetic dataset, train a tiny BLIP-2 OPT, evaluate,
#             print metrics
# make test : set up the venv with every extra, run the default test suite (offline, CPU, < 10 min)
# make bench: run every bench/*.py (quick sizes, < 20 min on 2 cores), print a table, regenerate BENCHMARKS.md
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CORE_STAMP := $(VENV)/.lavis-ext-core
STAMP  := $(VENV)/.lavis-ext-installed
DATA   ?= data/synthetic
DEMO_OUT ?= runs/demo

.PHONY: setup setup-core browser demo test test-slow data bench clean

# Two stamps: the demo (training, evaluation, data) needs the core package alone; the tests, benchmarks and
# serving/export also need the extras. Both re-run when the dependency list changes; torch/torchvision come
# from pip's configured local wheels.
setup-core: $(CORE_STAMP)
setup: $(STAMP)

$(CORE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	$(PY) -m pip install -q --no-deps salesforce-lavis==1.0.2
	touch $@

$(STAMP): $(CORE_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,export,serve,video,quant]"
	$(PY) -m pip install -q --no-deps -c constraints.txt img2dataset  # see the dev extra in pyproject.toml
	touch $@

data: setup-core
	$(PY) -m lavis_ext.datasets.synthetic --out $(DATA)

demo: data
	$(PY) train.py --cfg-path projects/tiny/caption_opt.yaml --options run.output_dir=$(DEMO_OUT)
	$(PY) -m lavis_ext.summary $(DEMO_OUT)

# make demo-seeds: the demo recipe over seeds 42, 43, 44 (1 thread each, 2 at a time: ~20 min on 2 cores), then the
# mean ± std table; `make bench` reads these runs for BENCHMARKS.md's over-seeds row.
SEEDS ?= 42 43 44
SEEDS_OUT ?= runs/demo_seeds
.PHONY: demo-seeds
demo-seeds: data
	mkdir -p $(SEEDS_OUT)
	printf '%s\n' $(SEEDS) | xargs -P 2 -I{} env OMP_NUM_THREADS=1 $(PY) train.py --cfg-path projects/tiny/caption_opt.yaml \
	  --options run.seed={} run.output_dir=$(SEEDS_OUT)/seed{} > $(SEEDS_OUT).log 2>&1 || (tail -40 $(SEEDS_OUT).log; exit 1)
	$(PY) -m lavis_ext.report $(addprefix $(SEEDS_OUT)/seed,$(SEEDS))

# The Gradio test drives Debian's chromium headless; the test skips (with the reason) where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  (command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1))) || \
	  echo "note: chromium/chromedriver not installed; the browser test will be skipped"

test: setup browser
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup data  # the serving benchmark needs the serve extra, and the bench extra for its LitServe peer
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) bench/run_all.py

clean:
	rm -rf $(DEMO_OUT) $(DATA)

# make reproduce: the BLIP-2 paper's three ablations in miniature, 3 seeds each (docs/reproduce.md), 2 arms at
# a time on 1 thread each; about 1 h on 2 cores. Re-running skips finished arms and resumes an interrupted one.
REPRO_OUT ?= runs/reproduce
.PHONY: reproduce
reproduce: data
	$(PY) -m lavis_ext.reproduce --out $(REPRO_OUT) --jobs 2 --threads 1
