# `make run`: set up and run the whole pipeline with params.yaml; `make test`: set up and run the tests
# (`make test-fast`: the unit tier only, the tests not marked integration).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

# The pipeline image, one reference for `make image push pipeline`: IMAGE if given (commit-tagged or a
# digest), else $(REGISTRY)/sfddm:git-<12 hex of HEAD>. sfddm_runtime/image.py prints it, or stops make with
# one line: a mutable tag, or uncommitted changes to files that go into the image. Worked out once, on
# first use, so that targets that do not need it never run it.
REGISTRY ?= ghcr.io/sfddm
IMAGE ?=
IMAGE_REF = $(eval IMAGE_REF := $(or $(shell $(PYTHON) sfddm_runtime/image.py --registry '$(REGISTRY)' \
	$(if $(IMAGE),--image '$(IMAGE)')),$(error no image reference, see the line above)))$(IMAGE_REF)
# docker build -t and docker push need a tag; a digest (IMAGE=NAME@sha256:...) names an image already pushed.
IMAGE_TAG = $(if $(findstring @,$(IMAGE_REF)),$(error IMAGE=$(IMAGE_REF) is a digest, which only \
	`make pipeline` takes; build and push need a tag, e.g. IMAGE=$(REGISTRY)/sfddm:git-<commit>),$(IMAGE_REF))

.PHONY: install run test test-fast bench serve pipeline image push clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

run: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

# One pytest-xdist worker per core; a test file stays on one worker (its module fixtures are built once), and
# files go out in collection order, the longest first (tests/conftest.py LONGEST_FIRST), not by test count.
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder -m "not integration"

# photos16 with a teacher trained 4 x longer: a run of its own beside the sweep of the settings as they are.
TEACHER10K = --dataset photos16 --set teacher.iterations=10000 --name teacher10k

bench: install
	$(BIN)/dvc repro train_classifier sample_teacher distill
	$(BIN)/sfddm bench quality --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality --profile full --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality --dataset photos16 --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality --dataset photos16 --profile full --variants base,steps=2,steps=8,lr=5e-4,clip_substeps --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality $(TEACHER10K) --variants base,steps=2,steps=8 --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality $(TEACHER10K) --profile full --variants base,steps=2 --results-page docs/benchmarks.md
	$(BIN)/sfddm bench quality --dataset photos32 --variants base,steps=2,steps=8 --results-page docs/benchmarks.md
	$(BIN)/sfddm bench attribution --results-page docs/benchmarks.md
	$(BIN)/sfddm bench attribution --dataset photos16 --results-page docs/benchmarks.md
	$(BIN)/sfddm bench attribution $(TEACHER10K) --results-page docs/benchmarks.md
	$(BIN)/sfddm bench speed --results-page docs/benchmarks.md
	$(BIN)/sfddm bench preemption --results-page docs/benchmarks.md
	$(BIN)/python -m benchmarks.serving --results-page docs/benchmarks.md

# The champion (models:/sfddm-student@champion) of the registry at MLFLOW_TRACKING_URI (default
# sqlite:///mlflow.db, as `make run` fills it) on http://127.0.0.1:5001 (POST /invocations).
serve: install
	$(BIN)/sfddm serve

pipeline: install
	$(BIN)/sfddm pipeline compile --image $(IMAGE_REF)

image:
	docker build -f components/Dockerfile -t $(IMAGE_TAG) .

push:
	docker push $(IMAGE_TAG)

clean:
	rm -rf data/prepared data/classifier.pt models samples metrics reports/evaluate kfp-local
