# fmalib: `make install`, `make test`, then `make reproduce`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/toy.yaml

.PHONY: install test reproduce report lab foundation bench strip

install:
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, on its own: pip takes the local CPU-usable build where one is provided.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"
	bash tools/install_detectron2.sh $(PY)
	$(PY) -m pip install -q -e ".[crf]" || echo "note: dense CRF (pydensecrf2) did not install; CRF post-processing will be skipped"
	# nbstripout as a git filter for notebooks/ only (.gitattributes): `nbstripout --install` would also
	# write a repo-wide attribute that strips the executed copies in reports/.
	-git config filter.nbstripout.clean "$(abspath $(VENV))/bin/nbstripout"
	-git config filter.nbstripout.smudge cat
	-git config filter.nbstripout.required true

test:
	# the layer contracts of pyproject.toml first (seconds), then the tests: two workers, a file each, so the
	# two end-to-end study tests (toy notebooks, voc/coco params) overlap
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --dist loadfile

foundation:
	$(PY) -m fmalib foundation --params $(PARAMS)

reproduce:
	$(PY) -m fmalib reproduce --params $(PARAMS)

report:
	$(PY) -m fmalib report --params $(PARAMS)

bench:
	# bench/gpu.py needs a GPU (tests/test_bench.py runs its CPU --dry-run)
	for b in bench/*.py; do [ $$b = bench/gpu.py ] || $(PY) $$b || exit 1; done

lab:
	$(VENV)/bin/jupyter lab notebooks/

strip:
	$(VENV)/bin/nbstripout notebooks/*.ipynb
