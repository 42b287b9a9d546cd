# ortseq: the front door. `make demo` sets everything up and runs the main job; `make test` tests.
PY      := .venv/bin/python
ORTSEQ  := .venv/bin/ortseq
MODEL   ?= tiny-pegasus
EXPORTS ?= exports

.PHONY: all demo setup export generate serve loadtest bundle bench-bundle test test-full bench bench-lsg lint lsg-golden clean

all: demo

setup: .venv/.installed .venv-hf4/.installed

# torch is pinned in the same pip call, or pip pulls the multi-GB CUDA build
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q "torch==2.13.0" -e ".[export,serve,bench,dev]"
	touch $@

# transformers 4.x, only to check our tokenizer against its slow (sentencepiece) PegasusTokenizer
.venv-hf4/.installed:
	python3 -m venv .venv-hf4
	.venv-hf4/bin/pip install -q "transformers==4.57.6" sentencepiece protobuf
	touch $@

demo: setup  ## the main job: export the embedded default model and summarize with it
	$(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)
	printf '%s\n' \
	  "The city council said the new river bridge will open next year after the election, the minister reported." \
	  "Police said the museum was closed on Sunday when water from the river reached the station." \
	  | $(ORTSEQ) generate $(EXPORTS)/$(MODEL)

export: setup
	$(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)

# HTTP server (README "Serving"): make serve MODEL=tiny-pegasus PORT=8080
PORT    ?= 8080
serve: setup
	test -f $(EXPORTS)/$(MODEL)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)
	$(ORTSEQ) serve $(EXPORTS)/$(MODEL) --host 127.0.0.1 --port $(PORT)

# loopback load test against tiny-pegasus: dynamic batching vs batch size 1 (benchmarks/results/load_test.*)
loadtest: setup
	$(PY) benchmarks/load_test.py

# edge bundle (README "Edge bundle"): make bundle MODEL=tiny-pegasus -> bundles/tiny-pegasus
bundle: setup
	test -f $(EXPORTS)/$(MODEL)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)
	$(ORTSEQ) bundle $(EXPORTS)/$(MODEL) --out bundles/$(MODEL)

# bundle size and peak RSS of one summarize call, for any export dir: make bench-bundle EXPORT=exports/x
EXPORT  ?= $(EXPORTS)/$(MODEL)
bench-bundle: setup
	test -f $(EXPORT)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORT)
	$(PY) benchmarks/bench_bundle.py $(EXPORT)

test: setup
	$(PY) -m pytest -q -m "not slow"

test-full: setup
	$(PY) -m pytest -q

# every system of issue 5 on the same workload; BENCH_ARGS narrows it (see benchmarks/bench.py --help)
bench: setup .venv-optimum/.installed
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# optimum needs transformers < 4.58: its own venv, used only by benchmarks/systems/optimum_ort.py
.venv-optimum/.installed:
	python3 -m venv .venv-optimum
	.venv-optimum/bin/pip install -q "torch==2.13.0" "transformers<4.58" "optimum-onnx[onnxruntime]" sentencepiece protobuf
	touch $@

# LSG encoder at 1024/2048/4096 tokens: ours vs the reference code (its own pinned venv) vs full attention
bench-lsg: setup
	bash scripts/lsg_golden/setup_env.sh
	$(PY) benchmarks/bench_lsg.py

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

lsg-golden:
	bash scripts/lsg_golden/setup_env.sh
	.venv-lsg-ref/bin/python scripts/lsg_golden/make_goldens.py

clean:
	rm -rf $(EXPORTS) .cache .pytest_cache
