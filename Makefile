# heimdall — see README.md. Every target that needs PostgreSQL installs it first when missing,
# and only what it needs: `make demo` the server alone, `make test` the test tools too.
PREFIX ?= /usr/local
CARGO ?= cargo

.PHONY: build test test-matrix lint demo install deps demo-deps man completions dist dist-test

build:
	$(CARGO) build --release --locked

# What `make test` needs (the PostgreSQL server, PgBouncer, man, systemd-analyze), when missing.
deps:
	scripts/ensure-deps

# What `make demo` needs: the PostgreSQL server alone.
demo-deps:
	scripts/ensure-deps --demo

# The whole suite: unit tests and integration tests against throwaway PostgreSQL clusters.
test: deps
	$(CARGO) test --locked

# The core of the integration suite against PostgreSQL 14 and 18 (the oldest and newest
# supported; `make test` runs all of it on Debian's 15): server binaries from the npm registry,
# cached under target/postgres (scripts/fetch-postgres, scripts/test-postgres). PG_MAJORS="18"
# for one.
PG_MAJORS ?= 14 18
test-matrix: deps
	CARGO="$(CARGO)" scripts/test-postgres $(PG_MAJORS)

# The shape of src/ (no import cycle, imports point down the layers of ARCHITECTURE.md, no file
# over 500 lines), then formatting and clippy.
lint:
	scripts/check-modules
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# A throwaway PostgreSQL, a first run holding the lock, a second refused, then a third that runs.
demo: demo-deps build
	scripts/demo target/release/heimdall

# Performance figures against a throwaway PostgreSQL (not part of `make test`; a few minutes):
# bench/results.md, hyperfine's exports in bench/out/. BENCH_IDLE_SECONDS=5 for a quicker run.
.PHONY: bench
bench:
	CARGO="$(CARGO)" bench/run

# The manual page and shell completions, generated from the clap definitions by the binary.
man: build
	mkdir -p target/man
	target/release/heimdall man > target/man/heimdall.1

completions: build
	mkdir -p target/completions
	target/release/heimdall completions bash > target/completions/heimdall.bash
	target/release/heimdall completions zsh > target/completions/_heimdall
	target/release/heimdall completions fish > target/completions/heimdall.fish

install: build man completions
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)$(PREFIX)/share/zsh/site-functions \
		$(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	install -m 0755 target/release/heimdall $(DESTDIR)$(PREFIX)/bin/heimdall
	install -m 0644 target/man/heimdall.1 $(DESTDIR)$(PREFIX)/share/man/man1/heimdall.1
	install -m 0644 target/completions/heimdall.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/heimdall
	install -m 0644 target/completions/_heimdall $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_heimdall
	install -m 0644 target/completions/heimdall.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/heimdall.fish

# Release artifacts in target/dist/ (see scripts/dist): a tarball whose binary runs on glibc 2.17
# and later, a .deb, SHA256SUMS. Installs zig, cargo-zigbuild and cargo-deb under target/ when
# missing (scripts/ensure-dist-tools). Minutes, so not part of `make test`. TAG=vX.Y.Z checks the
# version.
dist:
	CARGO="$(CARGO)" TAG="$(TAG)" scripts/dist

# `make dist`, then the README's install steps run against target/dist (tests/it/dist.rs, ignored
# by `make test`): checksums, the glibc bound, a locked command with the unpacked binary, the .deb's
# files, its binary and its man page.
dist-test: deps dist
	$(CARGO) test --locked --test it -- --ignored dist::
