-- A service writing an event through the WAL-message outbox: the event
-- commits or rolls back with the order, and no outbox row is written.
BEGIN;
INSERT INTO orders (id, customer, total_cents) VALUES ('o-42', 'c-7', 1299);
SELECT outboxd_emit(
    'Order',                                     -- aggregatetype: the topic outbox.Order
    'o-42',                                      -- aggregateid: the Kafka key
    'OrderCreated',                              -- type
    '{"orderId": "o-42", "totalCents": 1299}',   -- payload, published as written
    '{"tenant": "acme"}'                         -- headers (optional)
);                                               -- returns the event id (a uuid)
COMMIT;

-- Without the function, write encoding version 1 yourself, always with
-- transactional = true (false is refused: it is written even on rollback):
--   SELECT pg_logical_emit_message(true, 'outboxd',
--     '{"v":1,"id":"…","aggregatetype":"Order","aggregateid":"o-42","type":"OrderCreated","payload":{…}}');
