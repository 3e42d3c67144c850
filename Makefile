# imgflow: build, test and benchmark.
#
#   make build     hosts in release + every plugin (wasm32-wasip2)
#   make plugins   the plugins only, to plugins/target/wasm32-wasip2/release/<name>.wasm
#   make test      every test (builds what it needs first)
#   make bench     filter and sandbox figures beside libvips (docs/BENCHMARKS.md)
#   make load      end-to-end figures against the running system (make up)
#   make lint      rustfmt and clippy, warnings are errors
#   make up        the whole system, natively (scripts/native.sh); make down,
#                  make status, make logs
#   make env       an .env with fresh secrets, for `docker compose up`

CARGO ?= cargo
PLUGINS_MANIFEST := plugins/Cargo.toml

.PHONY: load load-scale soak bench-deps env all build plugins plugins-component template test test-plugins test-hosts test-prometheus test-deps bench lint fmt clean up down status logs

all: build

build: plugins
	$(CARGO) build --release --workspace

# The built-in plugins are copied to target/builtin-plugins, the worker's
# default PLUGINS_DIR (the other plugins are examples and test plugins).
BUILTIN_PLUGINS := grayscale blur sharpen resize crop rotate flip
plugins:
	cd plugins && $(CARGO) build --release --target wasm32-wasip2
	mkdir -p target/builtin-plugins
	for p in $(BUILTIN_PLUGINS); do cp plugins/target/wasm32-wasip2/release/$$p.wasm target/builtin-plugins/; done
	# A second version of the example plugin, for the plugin-management tests.
	cd plugins && IMGFLOW_PLUGIN_VERSION=0.2.0 $(CARGO) build --release --target wasm32-wasip2 -p invert --target-dir target/v2

# The plugin-author path: the same crates built with `cargo component`
# (wasm32-wasip1 plus the preview-2 adapter). Tests check the result runs.
plugins-component:
	cd plugins && $(CARGO) component build --release -p grayscale -p blur

# A new plugin, made and built the way an author makes one: `imgflow new`,
# then both builds. Tests run the results and `imgflow check` them.
TEMPLATE_BUILD := target/template-build
template: build
	rm -rf $(TEMPLATE_BUILD)
	target/release/imgflow new my-filter --dir $(TEMPLATE_BUILD)
	cd $(TEMPLATE_BUILD) && $(CARGO) component build --release
	cd $(TEMPLATE_BUILD) && $(CARGO) build --release --target wasm32-wasip2

# End-to-end tests spawn the release binaries that `make build` made.
test: test-deps build plugins-component template test-prometheus test-plugins test-hosts

# Tools the tests need, installed when missing (scripts/test-deps.sh).
test-deps:
	@scripts/test-deps.sh

# The Prometheus config and rules, and the alerts' unit tests (promtool,
# from the Debian package prometheus).
PROMTOOL ?= promtool
test-prometheus:
	$(PROMTOOL) check config prometheus/prometheus.yml
	$(PROMTOOL) check rules prometheus/rules/*.yml
	cd prometheus && $(PROMTOOL) test rules tests/alerts.test.yml

# The filters' math, natively.
test-plugins:
	$(CARGO) test --manifest-path $(PLUGINS_MANIFEST) -p imgflow-filters

# The end-to-end tests create a database each, as IMGFLOW_TEST_PG (default:
# the postgres role if the server trusts local connections, else the role
# `make up` created). The tests build in the release profile: the
# dependencies `make build` compiled are reused (wasmtime is not compiled a
# second time, about 3 minutes saved), and the wasm and image work in the
# tests runs at the speed the services do. The two flood tests of fair
# share (ALONE_TESTS) run after the others, one at a time: each measures
# queue waits and throughput against a run of its own, and with other tests
# on the two cores the API's submissions slowed to 48/s in one CI run and
# the workers drained A's backlog before the flood ended.
# The two-minute soak runs with them, alone too: it runs five services and
# their faults, and its timings (leases, outages) assume the cores are its.
# `make soak` runs the long one (SOAK_TEST, an ignored test).
ALONE_TESTS = fairness::a_flood_of_one_key soak::two_minutes_of_soak_keep_every_invariant
SOAK_TEST = soak::the_soak_keeps_every_invariant
test-hosts:
	IMGFLOW_TEST_PG="$${IMGFLOW_TEST_PG:-$$(scripts/test-deps.sh --pg-url)}" $(CARGO) test --release --workspace -- $(foreach t,$(ALONE_TESTS),--skip $(t))
	IMGFLOW_TEST_PG="$${IMGFLOW_TEST_PG:-$$(scripts/test-deps.sh --pg-url)}" $(CARGO) test --release -p imgflow-system-tests --test system -- --test-threads=1 --nocapture $(ALONE_TESTS)

# The soak with its faults for SOAK_DURATION (default 10 minutes; 1h for
# the long run; 2m is the short version), SOAK_SEED to repeat a run
# (docs/SOAK.md).
SOAK_DURATION ?= 10m
soak: test-deps build plugins
	SOAK_DURATION=$(SOAK_DURATION) IMGFLOW_TEST_PG="$${IMGFLOW_TEST_PG:-$$(scripts/test-deps.sh --pg-url)}" $(CARGO) test --release -p imgflow-system-tests --test system -- --ignored --exact --nocapture $(SOAK_TEST)

# libvips (the yardstick) and pyvips, installed when missing.
bench-deps:
	@scripts/bench-deps.sh

bench: bench-deps plugins
	$(CARGO) bench -p imgflow-runtime --bench runtime

# Drives the system `make up` started; prints completed/s and latencies
# from the job records, and libvips's figure for the same photo jobs.
load: bench-deps
	$(CARGO) build --release -p imgflow-load
	scripts/load.sh

# Whether the job path's cost depends on history or queue depth: seeds a
# million finished jobs of the same key (and more), runs flat out again,
# times the overview and the retention sweep, deletes what it seeded.
load-scale: bench-deps
	$(CARGO) build --release -p imgflow-load
	scripts/scale.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --all --manifest-path $(PLUGINS_MANIFEST) -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd plugins && $(CARGO) clippy --target wasm32-wasip2 --workspace --exclude imgflow-filters -- -D warnings
	$(CARGO) clippy --manifest-path $(PLUGINS_MANIFEST) -p imgflow-filters --all-targets -- -D warnings

# The whole system without Docker: Redis, PostgreSQL, Prometheus, the API
# and a worker (see scripts/native.sh; state and logs in .imgflow/).
up down status logs:
	@scripts/native.sh $@

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --all --manifest-path $(PLUGINS_MANIFEST)

clean:
	$(CARGO) clean
	$(CARGO) clean --manifest-path $(PLUGINS_MANIFEST)

# The secrets compose requires, generated once into .env (never
# overwritten: delete a line to have it generated again).
env:
	@touch .env && chmod 600 .env
	@for v in IMGFLOW_ADMIN_TOKEN RESULT_URL_SECRET COMPILE_CACHE_SECRET POSTGRES_PASSWORD GRAFANA_ADMIN_PASSWORD; do \
	  grep -q "^$$v=" .env || echo "$$v=$$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >> .env; \
	done
	@echo ".env has IMGFLOW_ADMIN_TOKEN, RESULT_URL_SECRET, COMPILE_CACHE_SECRET, POSTGRES_PASSWORD, GRAFANA_ADMIN_PASSWORD"
