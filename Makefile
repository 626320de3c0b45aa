# Convenience targets; the README's two commands are the source of truth.
.PHONY: serve test bench bench-smoke services

serve:
	python3 -m pip install -e . && python3 -m quartchat serve

test:
	python3 -m pip install -e '.[test]' && python3 -m pytest

services:
	bash ops/ensure-services.sh

# Starts 2 servers (MariaDB + Redis) itself, runs every scenario, stops everything,
# prints the table and writes it into README.md's performance section.
bench: services
	python3 -m pip install -q -e '.[test,bench]'
	python3 ops/bench/bench.py all --update-readme

bench-smoke: services
	python3 ops/bench/bench.py smoke --results /tmp/quartchat-bench-smoke.jsonl
