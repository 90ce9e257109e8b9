-- Retention (`[retention]` in the configuration): old decisions are found by time, and a decision
-- is kept while a message still names it.
CREATE INDEX decisions_by_time ON decisions (at_ms);
CREATE INDEX messages_by_decision ON messages (decision_id);
