"""Kafka side of onetower: event schemas, topics, the producer SDK and the faust stream processors."""
