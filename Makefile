SHELL=/bin/bash
LINT_PATHS=sb3_uepo/ tests/ benchmarks/

pytest:
	python -m pytest -n 2 tests/

pytest-slow:
	python -m pytest -m slow tests/

type:
	mypy sb3_uepo/

lint:
	ruff check ${LINT_PATHS}

format:
	ruff check --select I --fix ${LINT_PATHS}
	black ${LINT_PATHS}

check-codestyle:
	black --check ${LINT_PATHS}

commit-checks: format type lint

.PHONY: pytest pytest-slow type lint format check-codestyle commit-checks
