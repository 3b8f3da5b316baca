# The two commands of the README. Both install into .venv first (idempotent).
.PHONY: setup demo test bench clean

setup:
	scripts/setup.sh cpu,model,test

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo.py

test: setup
	scripts/setup-system.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -v --durations=15 tests

bench:
	scripts/setup.sh cpu,model,test,bench
	HF_HUB_OFFLINE=1 .venv/bin/python bench/suite.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/dtype.py

clean:
	rm -rf .venv *.egg-info .pytest_cache
