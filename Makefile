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
	$(BIN)/ruff check anchor_lib tests benchmarks

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not book" -q

# One thread: the chapters' tiny models gain nothing from two, and lose 5-20x when they share.
book: $(STAMP)
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
