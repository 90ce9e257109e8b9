-- Faults injected by `mailgate simulate`: the principal's sends fail with `code` until `until_ms`.
CREATE TABLE simulated_faults (
    principal     TEXT    PRIMARY KEY,
    code          TEXT    NOT NULL,
    until_ms      INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    actor         TEXT    NOT NULL
);
