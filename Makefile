.PHONY: install test lint bench bench-real eval demo

install:
	python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[all]'

test:
	.venv/bin/ruff check . && .venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check .

demo:
	.venv/bin/sorakit generate "a red circle moving right" --out red_circle.mp4

bench:
	.venv/bin/python -m benchmarks.run_all --out docs/benchmarks

# the real-size end-to-end benchmark (docs/benchmarks.md, "End to end at real size"); REAL_BUNDLE
# is an Open-Sora 1.2 bundle optimised as benchmarks/e2e_real.py's docstring says (24 GB, ~1 h)
REAL_BUNDLE ?= ../real/os12-144x256-opt2
bench-real:
	.venv/bin/python -m benchmarks.e2e_real --bundle $(REAL_BUNDLE) --out docs/benchmarks

eval:
	.venv/bin/sorakit eval --out docs/benchmarks
