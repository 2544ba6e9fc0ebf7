.PHONY: setup test test-fast demo stack-up stack-down

setup:            ## install everything: Python deps, Kafka jars, redis-server, Milvus server
	bash scripts/setup.sh

test:             ## the whole suite; starts the local stack if it is not running
	python3 -m pytest -q

test-fast:        ## pure unit tests only (no servers)
	python3 -m pytest -q -m "not stack"

demo:             ## the main job end to end on the embedded default
	onetower demo

stack-up:
	onetower stack up

stack-down:
	onetower stack down
