# Every target bootstraps its own virtualenv from pyproject.toml: nothing depends on what was
# installed by hand. PYTHON picks the interpreter that creates it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: venv demo test pytest lint docs bench clean pgbouncer

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## the main job: stock scoped_session versus greenscope, side by side, on embedded SQLite
demo: $(STAMP)
	$(PY) examples/demo.py

## the whole suite: lint and types, every test (slow ones included), the docs build
test: lint pytest docs

# pytest exit code 5 means "no tests ran": that is a failure here, never a silent pass.
pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check greenscope tests bench examples
	$(PY) -m ruff format --check greenscope tests bench examples
	$(PY) -m mypy

docs: $(STAMP)
	@if [ -f mkdocs.yml ]; then $(PY) -m mkdocs build --strict --site-dir $(VENV)/site; \
	else echo "docs: no mkdocs.yml yet"; fi

bench: $(STAMP)
	$(PY) bench/run.py

## Debian's pgbouncer, which tests/test_pgbouncer.py starts (a failure under CI when missing)
pgbouncer:
	@command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || \
	{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer; }

.PHONY: dist-check test-matrix

## packaging: sdist, a py3-none-any wheel built from it, twine check, contents, fresh-venv smoke
dist-check: $(STAMP)
	$(PY) .ci/dist_check.py

## the suite (not slow) under CPython 3.9, 3.10, 3.12 and 3.13 (pyenv), each in its .venv-X.Y,
## then on 3.9 at the lowest versions pyproject.toml allows (.venv-lowest). MATRIX_ARGS: e.g.
## --versions 3.12 --no-lowest
test-matrix: $(STAMP)
	$(PY) .ci/test_matrix.py $(MATRIX_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
