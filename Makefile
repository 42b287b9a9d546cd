# ortseq: the front door. `make demo` sets everything up and runs the main job; `make test` tests.
PY      := .venv/bin/python
ORTSEQ  := .venv/bin/ortseq
MODEL   ?= tiny-pegasus
EXPORTS ?= exports
TO      ?= int8
DEMO    := tiny-pegasus-trained

.PHONY: all demo setup export quantize generate serve loadtest bundle bench-bundle bench-sweep bench-floor test test-full test-ray bench-ray bench bench-lsg lint lsg-golden legacy-golden clean

all: demo

setup: .venv/.installed .venv-hf4/.installed

# torch is pinned in the same pip call, or pip pulls the multi-GB CUDA build
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q "torch==2.13.0" -e ".[export,serve,bench,dev,ray]"
	touch $@

# transformers 4.x, only to check our tokenizer against its slow (sentencepiece) PegasusTokenizer
.venv-hf4/.installed:
	python3 -m venv .venv-hf4
	.venv-hf4/bin/pip install -q "transformers==4.57.6" sentencepiece protobuf
	touch $@

# the main job: export the trained tiny model (trained once per user, cached in ~/.cache/ortseq/), quantize it
# to int8 with its quality report, and summarize two documents with the int8 export
demo: setup
	$(ORTSEQ) export $(DEMO) --out $(EXPORTS)/$(DEMO) --force
	$(ORTSEQ) quantize $(EXPORTS)/$(DEMO) --to int8 --out $(EXPORTS)/$(DEMO)-int8 --force
	printf '%s\n' \
	  "The city council approved a new bridge by the river after the election. About 40 people attended the meeting. Critics said the plan came too late." \
	  "Police closed the village library in the old town on Sunday. A spokesperson said more details would follow. Residents were asked to send comments by email." \
	  | $(ORTSEQ) generate $(EXPORTS)/$(DEMO)-int8

export: setup
	$(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL) --force

quantize: setup  ## make quantize MODEL=tiny-pegasus-trained TO=int8|int4|fp16 (the fp32 export must exist)
	$(ORTSEQ) quantize $(EXPORTS)/$(MODEL) --to $(TO) --out $(EXPORTS)/$(MODEL)-$(TO) --force

# HTTP server (docs/serving.md): make serve MODEL=tiny-pegasus PORT=8080
PORT    ?= 8080
serve: setup
	test -f $(EXPORTS)/$(MODEL)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)
	$(ORTSEQ) serve $(EXPORTS)/$(MODEL) --host 127.0.0.1 --port $(PORT)

# loopback load test against tiny-pegasus: dynamic batching vs batch size 1 (benchmarks/results/load_test.*)
loadtest: setup
	$(PY) benchmarks/load_test.py

# edge bundle (docs/bundle.md): make bundle MODEL=tiny-pegasus -> bundles/tiny-pegasus
bundle: setup
	test -f $(EXPORTS)/$(MODEL)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORTS)/$(MODEL)
	$(ORTSEQ) bundle $(EXPORTS)/$(MODEL) --out bundles/$(MODEL) --force

# bundle size and peak RSS of one summarize call, for any export dir: make bench-bundle EXPORT=exports/x
EXPORT  ?= $(EXPORTS)/$(MODEL)
bench-bundle: setup
	test -f $(EXPORT)/manifest.json || $(ORTSEQ) export $(MODEL) --out $(EXPORT)
	$(PY) benchmarks/bench_bundle.py $(EXPORT)

# the checkpoint zoo (tests/test_checkpoint_files.py) is written by the 4.x versions of its fixtures
test: setup .venv-hf457/.installed
	$(PY) -m pytest -q -m "not slow"

test-full: setup .venv-hf457/.installed
	bash scripts/lsg_golden/setup_env.sh
	$(PY) -m pytest -q

# `ortseq batch` on Ray Data and `ortseq serve --replicas` on Ray Serve, on a local Ray (127.0.0.1, 2 CPUs)
test-ray: setup
	$(PY) -m pytest -q -m ray

# docs/ray.md: ortseq batch with 1 and 2 workers vs one process (benchmarks/results/ray_batch.*)
bench-ray: setup
	$(PY) benchmarks/bench_ray_batch.py

# every system on the same workload (docs/benchmarks.md); BENCH_ARGS narrows it (see benchmarks/bench.py --help)
bench: setup .venv-optimum/.installed
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# ortseq against CTranslate2 (fp32 and int8) over input lengths, new tokens, batch and beams: peak RSS and
# time at every point (docs/benchmarks.md); SWEEP_ARGS narrows it (see benchmarks/sweep.py --help)
bench-sweep: setup
	$(PY) benchmarks/sweep.py $(SWEEP_ARGS)

# greedy batch-1 decoder step against this machine's memory-bandwidth floor (docs/benchmarks.md)
bench-floor: setup
	$(PY) benchmarks/bandwidth_floor.py

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

# checkpoints written by transformers 4.57.6, with its own generate() outputs (tests/fixtures/legacy/):
# tokenizer vocabularies from ortseq's venv, then checkpoints and goldens from a pinned 4.57.6 venv, and the
# untied LSG-Pegasus ones from the LSG reference venv (transformers 4.47.1 + lsg-converter)
legacy-golden: setup .venv-hf457/.installed
	rm -rf .cache/legacy-tokenizers
	$(PY) scripts/legacy_golden/tokenizer_files.py .cache/legacy-tokenizers
	.venv-hf457/bin/python scripts/legacy_golden/make_fixtures.py .cache/legacy-tokenizers tests/fixtures/legacy
	bash scripts/lsg_golden/setup_env.sh
	.venv-lsg-ref/bin/python scripts/lsg_golden/make_legacy_fixtures.py .cache/legacy-tokenizers tests/fixtures/legacy

# torch pinned in the same pip call, or pip pulls the multi-GB CUDA build
.venv-hf457/.installed:
	python3 -m venv .venv-hf457
	.venv-hf457/bin/pip install -q "torch==2.13.0" "transformers==4.57.6" sentencepiece protobuf safetensors
	touch $@

clean:
	rm -rf $(EXPORTS) .cache .pytest_cache
