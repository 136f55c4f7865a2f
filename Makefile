# Two commands do everything on a fresh machine:
#   make demo   set up, write sample photos, index them with the offline starter model, search
#   make test   set up and run the test suite
#   make lint   ruff check and ruff format --check (CI runs it before the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed explicitly first: pip takes these from local files on the dev machines; elsewhere
# override, e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,offline,demo,bench,serve,formats
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

# tests/test_browser.py drives headless Chromium through its driver (Debian packages, never downloaded)
CHROMIUM_PACKAGES ?= chromium chromium-driver

.PHONY: install test lint demo bench clean browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# ruff comes with the test extra; settings in pyproject.toml [tool.ruff]
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: browser $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

# Chromium and chromedriver for the browser test: installed with apt-get when missing and this user is root or
# has password-less sudo; otherwise make stops at once with the one command to run.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; \
	else sudo="none"; fi; \
	if [ "$$sudo" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make test needs Chromium and chromedriver (tests/test_browser.py). Install them, then run make test again:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y $(CHROMIUM_PACKAGES)" >&2; \
	  exit 2; \
	fi; \
	echo "installing $(CHROMIUM_PACKAGES) for the browser test (apt-get)" >&2; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$sudo apt-get update -qq && $$sudo apt-get install -y -qq $(CHROMIUM_PACKAGES) >/dev/null

demo: $(VENV)/.installed
	rm -rf demo
	$(PY) benchmarks/samples.py demo/photos demo/captions.csv
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
