# `make run`: set up and run the whole pipeline with params.yaml; `make test`: set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

IMAGE = $(shell cd components && $(PYTHON) -c 'from image import IMAGE; print(IMAGE)')

.PHONY: install run test bench pipeline image clean

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

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/dvc repro train_classifier sample_teacher distill
	$(BIN)/sfddm bench quality --readme README.md
	$(BIN)/sfddm bench quality --profile full --readme README.md
	$(BIN)/sfddm bench speed --readme README.md

pipeline: install
	$(BIN)/sfddm pipeline compile

image:
	docker build -f components/Dockerfile -t $(IMAGE) .

clean:
	rm -rf data/prepared data/classifier.pt models samples metrics reports/evaluate kfp-local
