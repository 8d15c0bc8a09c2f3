# ANCHOR Book: `make book` builds the website, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ANCHOR_PROFILE ?= smoke
export ANCHOR_OFFLINE ?= 1
export PYTHONHASHSEED := 0

.PHONY: setup book test unit lint browser bench reproduce clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[book,test]'
	touch $@

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check anchor_lib tests benchmarks scripts book _ext

# One pytest worker per core (pytest-xdist): each test is single-threaded (tests/conftest.py);
# loadgroup keeps the tests of one xdist_group (the multi-process ones) on one worker.
unit: $(STAMP)
	$(BIN)/python -m pytest -m "not book" -q -n auto --dist loadgroup

# One thread per chapter: the chapters' tiny models gain nothing from two, and lose 5-20x when
# they share; execute_book.py runs one chapter per core instead, into the build's cache.
book: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/execute_book.py
	OMP_NUM_THREADS=1 $(BIN)/jupyter-book build -W -n --keep-going .

browser: $(STAMP)
	$(BIN)/python -m pytest -m book -q

test: lint unit book browser

bench: $(STAMP)
	$(BIN)/python -m anchor_lib bench

reproduce: $(STAMP)
	$(BIN)/python -m anchor_lib reproduce --profile full

clean:
	rm -rf _build
