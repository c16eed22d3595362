.PHONY: install test lint bench eval demo

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

eval:
	.venv/bin/sorakit eval --out docs/benchmarks
