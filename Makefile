# heimdall — see README.md. Every target that needs PostgreSQL installs it first when missing.
PREFIX ?= /usr/local
CARGO ?= cargo

.PHONY: build test lint demo install deps

build:
	$(CARGO) build --release --locked

deps:
	scripts/ensure-deps

# The whole suite: unit tests and integration tests against throwaway PostgreSQL clusters.
test: deps
	$(CARGO) test --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# A throwaway PostgreSQL, a first run holding the lock, a second refused, then a third that runs.
demo: deps build
	scripts/demo target/release/heimdall

install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 target/release/heimdall $(DESTDIR)$(PREFIX)/bin/heimdall
