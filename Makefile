# Two commands do all the set-up on a fresh machine:
#   make repro   create .venv if missing, install the pinned set, run the DVC pipeline
#   make test    same set-up, run the test suite
PY ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false

.PHONY: install repro test lint ui bench clean-venv system-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==26.3"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# `nmt params` first: a mistake in params.yaml stops here, before DVC deletes any stage's outputs
# (dvc.yaml's check_params stage does the same for a bare `dvc repro`).
repro: install
	nmt params > /dev/null
	dvc repro

# System requirements of some tests (README, Quickstart). Missing ones: their tests skip, naming
# the install command; with CI set they fail (.ci/run installs them).
PG_FOUND = $(shell command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && echo yes)
system-check:
	@missing=""; \
	[ -n "$(PG_FOUND)" ] || [ -n "$$TEAM_PG_BIN" ] || missing="$$missing postgresql"; \
	[ -x "$${NMT_CHROMIUM:-/usr/bin/chromium}" ] || missing="$$missing chromium"; \
	[ -x "$${NMT_CHROMEDRIVER:-/usr/bin/chromedriver}" ] || missing="$$missing chromium-driver"; \
	command -v g++ >/dev/null || command -v c++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  echo "make test: not installed:$$missing; the tests needing them will skip."; \
	  echo "  install: sudo apt-get install -y$$missing"; \
	fi

test: install system-check
	python -m pytest $(PYTEST_ARGS)

lint: install
	ruff check src pipelines tests bench

ui: install
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)

# Team tracking server: project-local PostgreSQL + `mlflow server` with proxied artifacts, state in
# .team-tracking/ (settings via TEAM_* variables, see docs/team-tracking.md). TEAM_S3=local adds a
# local S3-compatible store (SeaweedFS) for the DVC remote and MLflow's artifacts; `team-s3-up`
# starts that store alone. Keys: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
TEAM_PY = $(shell test -x $(BIN)/python && echo $(BIN)/python || echo $(PY))
.PHONY: team-up team-down team-status team-s3-up

team-up: install
	$(BIN)/python scripts/team_tracking.py start

team-down:
	$(TEAM_PY) scripts/team_tracking.py stop

team-status:
	$(TEAM_PY) scripts/team_tracking.py status

team-s3-up: install
	$(BIN)/python scripts/team_tracking.py start --s3-only --s3 local
