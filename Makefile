# Two commands do all the set-up on a fresh machine:
#   make repro   create .venv if missing, install the pinned set, run the DVC pipeline
#   make test    same set-up, run the test suite
PY ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false

.PHONY: install repro test lint ui bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==26.3"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

repro: install
	dvc repro

test: install
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
