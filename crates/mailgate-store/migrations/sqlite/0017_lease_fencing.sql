-- Write-backs fenced by the lease itself, and deliveries that may be second ones (issue 16
-- item 4). Every lease (and every take-back at a node's start) moves the message's
-- `lease_epoch`; a worker passes the epoch it leased under with every write-back (an attempt's
-- outcome, a capture, a lease extension), which changes nothing unless the row still has it:
-- a worker paused past its lease, or an earlier run of the same node, writes nothing, even
-- under the same owner name.
--
-- `lease_interrupted`: the lease that ended last ended without a recorded outcome (it expired
-- with its holder still owning it, or its node took it back at start). The holder may have sent
-- the message (killed after the smarthost's final 250 but before recording it), so the next
-- attempt's history rows are marked `possible_duplicate`; recording an outcome clears it. Set on
-- the lease, so a delivery costs no extra write.
ALTER TABLE messages ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN lease_interrupted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE delivery_attempts ADD COLUMN possible_duplicate INTEGER NOT NULL DEFAULT 0;
