# The two entry points: `make demo` runs the main job, `make test` the whole suite.
# Both create or refresh .venv first. torch is pinned (torch==2.13.0) in pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test venv clean browser

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	touch $@

$(VENV)/.demo: $(VENV)/.created pyproject.toml
	$(PIP) install -e '.[demo]'
	touch $@

$(VENV)/.test: $(VENV)/.created pyproject.toml
	$(PIP) install -e '.[demo,test]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/lemonslice demo

# The chat page's test drives Debian's Chromium through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: $(VENV)/.test browser
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache
