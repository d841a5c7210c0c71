# Shoal — the commands a newcomer and CI use. See README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
SERVICES := deploy/local/services.sh
ENV_FILE := .local/env
CARGO ?= cargo

.PHONY: help setup up down build image demo fleet demo-check llm test chaos fuzz lint fmt bench clean-local

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: ## install the system packages Shoal needs (apt-get; only what is missing)
	bash $(SERVICES) install

up: setup ## start RabbitMQ and Redis locally (project-local data, non-default ports)
	bash $(SERVICES) up

down: ## stop RabbitMQ and Redis
	bash $(SERVICES) down

build: ## build every binary
	$(CARGO) build --workspace --bins

image: ## build the container image without a Docker engine (buildah, root; not in make test)
	bash deploy/docker/build.sh

demo: setup build ## an agent task end to end: services, LLM, scheduler, worker, submit, watch live
	bash deploy/local/demo.sh

fleet: setup build ## the demo's fleet (services, LLM, scheduler, worker) kept running for your own tasks; Ctrl-C stops it
	SHOAL_DEMO_TASK=0 SHOAL_DEMO_STAY=1 bash deploy/local/demo.sh

demo-check: setup build ## the demo on the real local model, checked (slow; not in CI)
	bash deploy/local/demo-check.sh

llm: ## build llama-server and fetch the local model (make demo does this on first use)
	bash deploy/local/llm.sh install

test: setup ## build, start the services, run every suite, stop what it started
	bash tests/run.sh

chaos: setup ## fleet chaos (not in make test): 3 workers x 8 slots, 1,000 tasks, kill -9 every 5 s, RabbitMQ+Redis restarts; writes docs/RELIABILITY.md
	bash tests/chaos.sh

fuzz: ## fuzz the spec and LLM-response parsers, FUZZ_SECONDS (default 60) per target
	bash fuzz/run.sh

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

bench: setup ## run the benchmarks and write docs/BENCHMARKS.md
	bash benches/run.sh

clean-local: down ## remove the local service data (.local/)
	rm -rf .local
