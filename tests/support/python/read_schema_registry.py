"""Reads Kafka record values the way a Schema Registry consumer does.

Usage: read_schema_registry.py REGISTRY_URL. Each stdin line is one record
as JSON: {"topic": name, "format": "avro" or "json_schema", "value": hex}.
Each value is decoded by confluent-kafka's own AvroDeserializer or
JSONDeserializer, which read the Confluent framing, fetch the schema by its
id from the registry and (JSON Schema) validate the value against it. Each
decoded value is printed as one JSON line: {"schema_id": id, "value": ...}.
Run by tests/schema_registry.rs.
"""

import json
import sys

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> None:
    client = SchemaRegistryClient({"url": sys.argv[1]})
    deserializers = {
        "avro": AvroDeserializer(client),
        "json_schema": JSONDeserializer(None, schema_registry_client=client),
    }
    for line in sys.stdin:
        record = json.loads(line)
        value = bytes.fromhex(record["value"])
        context = SerializationContext(record["topic"], MessageField.VALUE)
        decoded = deserializers[record["format"]](value, context)
        print(json.dumps({"schema_id": int.from_bytes(value[1:5], "big"), "value": decoded}))


if __name__ == "__main__":
    main()
