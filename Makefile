# Every target bootstraps ./.venv on first use (.ci/setup), so a fresh clone needs nothing else.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: demo test typecheck lint docs bench setup

setup:
	@bash .ci/setup

demo: setup
	.venv/bin/fnllm demo

test: setup
	$(PY) -m ruff check fnllm tests benchmarks
	$(MAKE) --no-print-directory typecheck
	$(PY) -m pytest -n 2 --doctest-modules fnllm tests $(PYTEST_ARGS)

# mypy over fnllm/ with [tool.mypy] of pyproject.toml; fails on any error and prints the count
# ("Success: no issues found in N source files" or "Found N errors in M files").
typecheck: setup
	$(PY) -m mypy

lint: setup
	$(PY) -m ruff check fnllm tests benchmarks
	$(PY) -m ruff format --check fnllm tests benchmarks

docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

bench: setup
	$(PY) -m benchmarks.random --quick
