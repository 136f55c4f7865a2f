# Two commands do everything on a fresh machine:
#   make demo   set up, write sample photos, index them with the offline starter model, search
#   make test   set up and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed explicitly first: pip takes these from local files on the dev machines; elsewhere
# override, e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,offline,demo,bench,serve,formats
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(VENV)/.installed
	rm -rf demo
	$(PY) -m retrieval.samples demo/photos demo/captions.csv
	$(PY) cli.py index demo/photos --captions demo/captions.csv --index demo/index --model starter
	$(PY) cli.py info --index demo/index
	$(PY) cli.py search "a cat" --index demo/index -k 3
	$(PY) cli.py search "an astronaut" --index demo/index -k 3
	$(PY) cli.py search "a cup of coffee" --index demo/index -k 3
	$(PY) cli.py search "a rocket" --index demo/index -k 3
	$(PY) cli.py search "a motorbike" --index demo/index -k 3
	$(PY) cli.py search --image demo/photos/cat_chelsea.jpg --exclude-self --index demo/index -k 3
	$(PY) cli.py search --image demo/photos/cat_chelsea.jpg --to captions --index demo/index -k 3

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo .pytest_cache
