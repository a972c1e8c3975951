"""Reads Kafka records the way a CloudEvents consumer does.

Each stdin line is one record as JSON: {"headers": {name: value}, "key":
hex or null, "value": hex}. Each is parsed with the CloudEvents SDK's Kafka
binding (binary content mode), which refuses a record missing a required
attribute or carrying a `ce_time` that is not RFC 3339, and printed as one
JSON line of its attributes and data. Run by tests/cloudevents.rs.
"""

import json
import sys
from datetime import datetime, timezone

from cloudevents.core.bindings.kafka import KafkaMessage, from_binary_event


def utc(time: datetime | None) -> str | None:
    if time is None:
        return None
    return time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def main() -> None:
    for line in sys.stdin:
        record = json.loads(line)
        message = KafkaMessage(
            headers={name: value.encode("utf-8") for name, value in record["headers"].items()},
            key=bytes.fromhex(record["key"]) if record["key"] is not None else None,
            value=bytes.fromhex(record["value"]),
        )
        event = from_binary_event(message)
        print(
            json.dumps(
                {
                    "specversion": event.get_specversion(),
                    "id": event.get_id(),
                    "source": event.get_source(),
                    "type": event.get_type(),
                    "subject": event.get_subject(),
                    "time": utc(event.get_time()),
                    "datacontenttype": event.get_datacontenttype(),
                    "data": event.get_data(),
                }
            )
        )


if __name__ == "__main__":
    main()
